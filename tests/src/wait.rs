//! Waiting on what a test can observe: [`eventually`] polls a check until it holds and
//! fails the test, naming what it waited for, when it does not hold in time. A wait
//! that times out is a failure, never a fall-through.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] checks again.
pub const POLL: Duration = Duration::from_millis(200);

/// Calls `check` until it returns `Some`, every [`POLL`], and returns that value.
///
/// # Panics
///
/// When `within` has passed and `check` still returns `None`: the message names `what`
/// the test waited for.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_what_the_check_found_once_it_holds() {
        let mut calls = 0;
        let got = eventually("the third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for something that never happens")]
    async fn a_check_that_never_holds_fails_naming_what_it_waited_for() {
        eventually(
            "something that never happens",
            Duration::from_millis(300),
            || async { None::<()> },
        )
        .await;
    }
}
