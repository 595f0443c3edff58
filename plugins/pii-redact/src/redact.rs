//! The redaction itself: plain functions, unit-tested on the host.

/// Which kinds of PII to redact.
#[derive(Debug, Clone, Copy)]
pub struct Kinds {
    pub email: bool,
    pub phone: bool,
}

/// Fewest digits a phone number has (E.164 allows up to 15).
const MIN_PHONE_DIGITS: usize = 7;
const MAX_PHONE_DIGITS: usize = 15;

fn is_email_local(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

fn is_email_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-')
}

fn is_phone_char(c: char) -> bool {
    c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')' | '+')
}

/// Returns `text` with e-mail addresses and phone numbers replaced.
pub fn redact(text: &str, kinds: Kinds) -> String {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if kinds.email
            && let Some(end) = email_at(&chars, i)
        {
            out.push_str("[EMAIL]");
            i = end;
            continue;
        }
        if kinds.phone
            && let Some(end) = phone_at(&chars, i)
        {
            out.push_str("[PHONE]");
            i = end;
            continue;
        }
        out.push(chars[i].1);
        i += 1;
    }
    out
}

/// An address starting at `i` (at a word start): `local@domain.tld`. Returns its end.
fn email_at(chars: &[(usize, char)], i: usize) -> Option<usize> {
    if i > 0 && is_email_local(chars[i - 1].1) {
        return None;
    }
    let mut j = i;
    while j < chars.len() && is_email_local(chars[j].1) {
        j += 1;
    }
    if j == i || j >= chars.len() || chars[j].1 != '@' {
        return None;
    }
    let start = j + 1;
    let mut k = start;
    while k < chars.len() && is_email_domain(chars[k].1) {
        k += 1;
    }
    // Trailing dots and hyphens end the sentence, not the domain.
    while k > start && matches!(chars[k - 1].1, '.' | '-') {
        k -= 1;
    }
    let domain: String = chars[start..k].iter().map(|c| c.1).collect();
    let labels: Vec<&str> = domain.split('.').collect();
    let ok = labels.len() >= 2
        && labels.iter().all(|l| !l.is_empty())
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    ok.then_some(k)
}

/// A phone number starting at `i`: 7 to 15 digits with the usual separators, not glued
/// to a word or a longer number. Returns its end.
fn phone_at(chars: &[(usize, char)], i: usize) -> Option<usize> {
    let c = chars[i].1;
    if !(c.is_ascii_digit() || c == '+' || c == '(') {
        return None;
    }
    if i > 0 && (chars[i - 1].1.is_ascii_alphanumeric()) {
        return None;
    }
    let mut j = i;
    let mut digits = 0;
    let mut last_digit_end = i;
    while j < chars.len() && is_phone_char(chars[j].1) {
        if chars[j].1 == '+' && j != i {
            break;
        }
        if chars[j].1.is_ascii_digit() {
            digits += 1;
            last_digit_end = j + 1;
        } else if j + 1 < chars.len() && chars[j].1 == ' ' && chars[j + 1].1 == ' ' {
            break;
        }
        j += 1;
    }
    if last_digit_end < chars.len() && chars[last_digit_end].1.is_ascii_alphabetic() {
        return None;
    }
    (MIN_PHONE_DIGITS..=MAX_PHONE_DIGITS)
        .contains(&digits)
        .then_some(last_digit_end)
}

/// How much of a streamed `held` text can be emitted now: everything before the tail
/// that could still become part of an address or a phone number once more text comes.
pub fn safe_prefix_len(held: &str) -> usize {
    let tail_start = |pred: fn(char) -> bool| {
        held.char_indices()
            .rev()
            .take_while(|&(_, c)| pred(c))
            .last()
            .map_or(held.len(), |(i, _)| i)
    };
    let email = tail_start(|c| is_email_local(c) || c == '@');
    let phone = tail_start(is_phone_char);
    email.min(phone)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Kinds = Kinds {
        email: true,
        phone: true,
    };

    #[test]
    fn redacts_addresses_and_numbers() {
        let cases = [
            ("mail jane.doe+x@example.co.uk now", "mail [EMAIL] now"),
            ("call +1 (555) 123-4567.", "call [PHONE]."),
            (
                "call 555-123-4567 or 020 7946 0958",
                "call [PHONE] or [PHONE]",
            ),
            ("end: bob@mail.example.org.", "end: [EMAIL]."),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input, ALL), want, "{input}");
        }
    }

    #[test]
    fn leaves_lookalikes_alone() {
        let cases = [
            "the year 2024 and 42 apples",
            "version 1.2.3",
            "a@b is not an address",
            "x@example.c1 has a bad tld",
            "abc5551234567 is glued to a word",
            "12345678901234567890 is too long",
        ];
        for input in cases {
            assert_eq!(redact(input, ALL), input, "{input}");
        }
    }

    #[test]
    fn kinds_switch_off() {
        let text = "a@example.com 555-123-4567";
        let no_phone = Kinds {
            email: true,
            phone: false,
        };
        assert_eq!(redact(text, no_phone), "[EMAIL] 555-123-4567");
    }

    #[test]
    fn streaming_matches_whole_text() {
        let text = "Write to jane@example.com or call 555 123 4567 today, thanks.";
        for step in 1..8 {
            let mut held = String::new();
            let mut out = String::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(step) {
                held.extend(piece);
                let cut = safe_prefix_len(&held);
                let ready: String = held.drain(..cut).collect();
                out.push_str(&redact(&ready, ALL));
            }
            out.push_str(&redact(&held, ALL));
            assert_eq!(out, redact(text, ALL), "chunk size {step}");
        }
    }
}
