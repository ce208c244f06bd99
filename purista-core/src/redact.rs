//! Credentials never reach logs: one helper every bridge and the facade use to show a broker URL.

/// Replaces the password of `scheme://user:password@host/…` with `***`; everything else,
/// including a look-alike in the path, stays as it is.
///
/// Passwords are often pasted unencoded, so a password may contain `/`, `?`, `#` or `@`. The
/// authority therefore ends at the first `/`, `?` or `#` (or the end) where what follows the
/// last `@` before it is a plausible host (`name`, `name:port`, `[v6]`, `[v6]:port`), not at the
/// first `/`. When no such end exists, everything up to the last `@` counts as user info, so
/// a doubtful URL hides too much rather than too little.
///
/// ```
/// use purista_core::redact_url;
/// assert_eq!(redact_url("amqps://app:s3cret@mq:5671/prod"), "amqps://app:***@mq:5671/prod");
/// assert_eq!(redact_url("amqp://app:pa/ss@mq:5672/prod"), "amqp://app:***@mq:5672/prod");
/// assert_eq!(redact_url("amqp://user@h:5672/v"), "amqp://user@h:5672/v");
/// assert_eq!(redact_url("amqp://h:5672/v:x@y"), "amqp://h:5672/v:x@y");
/// assert_eq!(redact_url("memory://"), "memory://");
/// assert_eq!(redact_url("not a url"), "not a url");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let userinfo_end = match authority_end(rest) {
        Some(end) => rest[..end].rfind('@'),
        None => rest.rfind('@'),
    };
    let Some(at) = userinfo_end else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Where the authority of `rest` (the URL after `://`) ends: the first delimiter (or the end)
/// before which the text after the last `@` is a plausible host. `None` when there is none.
fn authority_end(rest: &str) -> Option<usize> {
    let delimiters = rest
        .char_indices()
        .filter(|(_, c)| matches!(c, '/' | '?' | '#'))
        .map(|(i, _)| i)
        .chain(std::iter::once(rest.len()));
    for end in delimiters {
        let candidate = &rest[..end];
        let host = candidate
            .rfind('@')
            .map_or(candidate, |at| &candidate[at + 1..]);
        if (candidate.is_empty() || is_host(host)) && !host.contains(['/', '?', '#']) {
            return Some(end);
        }
    }
    None
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` with a numeric (or empty) port.
fn is_host(host: &str) -> bool {
    let port_ok = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if let Some(v6) = host.strip_prefix('[') {
        return match v6.split_once(']') {
            Some((_, "")) => true,
            Some((_, after)) => after.strip_prefix(':').is_some_and(port_ok),
            None => false,
        };
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || c == '@' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_with_an_unencoded_slash_is_hidden() {
        assert_eq!(
            redact_url("amqp://app:pa/ss@mq:5672/prod"),
            "amqp://app:***@mq:5672/prod"
        );
    }

    #[test]
    fn a_password_with_query_or_fragment_characters_is_hidden() {
        assert_eq!(
            redact_url("amqp://app:pa?ss@mq:5672/prod"),
            "amqp://app:***@mq:5672/prod"
        );
        assert_eq!(
            redact_url("amqp://app:pa#ss@mq:5672/prod"),
            "amqp://app:***@mq:5672/prod"
        );
        assert_eq!(
            redact_url("amqp://app:p@/ss@mq:5672/prod"),
            "amqp://app:***@mq:5672/prod"
        );
    }

    #[test]
    fn a_password_with_a_slash_and_no_path_is_hidden() {
        assert_eq!(redact_url("amqp://app:a/b@mq"), "amqp://app:***@mq");
    }

    #[test]
    fn a_look_alike_in_the_path_stays() {
        assert_eq!(
            redact_url("amqp://mq:5672/vhost:with@sign"),
            "amqp://mq:5672/vhost:with@sign"
        );
        assert_eq!(
            redact_url("amqp://mq/user:pw@elsewhere"),
            "amqp://mq/user:pw@elsewhere"
        );
        assert_eq!(
            redact_url("amqp://[::1]:5672/a:b@c"),
            "amqp://[::1]:5672/a:b@c"
        );
    }

    #[test]
    fn a_user_without_password_stays() {
        assert_eq!(
            redact_url("amqp://user@mq:5672/prod"),
            "amqp://user@mq:5672/prod"
        );
    }
}
