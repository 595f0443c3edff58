//! The little DER needed to read certificate extension values.

/// Reads a DER INTEGER (non-negative, up to 8 bytes) from an extension value.
pub(crate) fn integer(value: &[u8]) -> Option<u64> {
    let (&tag, rest) = value.split_first()?;
    if tag != 0x02 {
        return None;
    }
    let (&len, body) = rest.split_first()?;
    let len = usize::from(len);
    if len == 0 || len > 9 || body.len() != len {
        return None;
    }
    if body[0] & 0x80 != 0 {
        return None;
    }
    body.iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(256).map(|v| v | u64::from(b))
    })
}

/// Reads an OCTET STRING (short or one-byte long form) or returns the raw bytes.
pub(crate) fn octets_or_raw(value: &[u8]) -> &[u8] {
    match value {
        [0x04, len, body @ ..] if usize::from(*len) == body.len() => body,
        [0x04, 0x81, len, body @ ..] if usize::from(*len) == body.len() => body,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn integers() {
        assert_eq!(super::integer(&[0x02, 0x01, 0x73]), Some(0x73));
        assert_eq!(super::integer(&[0x02, 0x02, 0x00, 0xd1]), Some(0xd1));
        assert_eq!(super::integer(&[0x02, 0x01, 0x80]), None, "negative");
        assert_eq!(super::integer(&[0x04, 0x01, 0x01]), None, "not an integer");
        assert_eq!(super::integer(&[0x02, 0x02, 0x01]), None, "short");
    }
}
