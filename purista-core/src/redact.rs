//! Credentials never reach logs: one helper every bridge and the facade use to show a broker URL.

/// Replaces the password of `scheme://user:password@host/…` with `***`; everything else,
/// including a look-alike in the path, stays as it is.
///
/// ```
/// use purista_core::redact_url;
/// assert_eq!(redact_url("amqps://app:s3cret@mq:5671/prod"), "amqps://app:***@mq:5671/prod");
/// assert_eq!(redact_url("amqp://user@h:5672/v"), "amqp://user@h:5672/v");
/// assert_eq!(redact_url("memory://"), "memory://");
/// assert_eq!(redact_url("not a url"), "not a url");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}
