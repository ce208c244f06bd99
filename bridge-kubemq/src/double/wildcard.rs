//! KubeMQ's channel wildcards, as its documentation states them for Events subscriptions:
//! channel names are dot-separated tokens; in a subscription's channel `*` stands for exactly
//! one token and `>` (last token only) for one or more tokens. Events Store, queries and queues
//! take no wildcards.

/// True when `pattern` holds a wildcard token.
pub fn has_wildcards(pattern: &str) -> bool {
    pattern.split('.').any(|t| t == "*" || t == ">")
}

/// Whether a subscription on `pattern` receives what is sent to `channel`.
pub fn matches(pattern: &str, channel: &str) -> bool {
    let mut tokens = channel.split('.');
    let mut parts = pattern.split('.').peekable();
    while let Some(part) = parts.next() {
        if part == ">" && parts.peek().is_none() {
            // One or more tokens remain.
            return tokens.next().is_some();
        }
        match tokens.next() {
            Some(token) if part == "*" || part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_is_one_token_and_gt_one_or_more_at_the_end() {
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(!matches("a.*", "a"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a.b"));
        assert!(
            !matches("a.>.c", "a.b.c"),
            "`>` counts only as the last token"
        );
        assert!(has_wildcards("a.*.b") && has_wildcards("a.>") && !has_wildcards("a*.b"));
    }
}
