//! The recording-host allow-list: the only check between a stored `RecordingUrl` and an
//! outbound request carrying a tenant's Exotel credentials, so the proxy can never be pointed
//! anywhere else (no open proxy, no credential leak to a third party).
//!
//! Rules: https only (plain http only for `127.0.0.1` when configured, for tests and the demo);
//! no userinfo in the URL; the host matches an entry. An entry `exotel.com` matches that host and
//! its subdomains (`recordings.exotel.com`, never `exotel.com.evil.net` or `notexotel.com`); an
//! entry with a path, `s3-ap-southeast-1.amazonaws.com/exotelrecordings/`, matches exactly that
//! host and only paths under that prefix, because an S3 host serves every customer's buckets.
//! Paths are compared after URL parsing, which resolves `..` and `%2e%2e` segments.

use anyhow::{Context, bail};
use url::{Host, Url};

/// The default allow-list: Exotel's own domains and the S3 bucket its recording URLs point at
/// (path-style and virtual-hosted forms). [U] Exotel's Mumbai cluster may use another bucket;
/// add it through `CALLBRIDGE_RECORDING_HOSTS`.
pub const DEFAULT_HOSTS: &[&str] = &[
    "exotel.com",
    "exotel.in",
    "s3-ap-southeast-1.amazonaws.com/exotelrecordings/",
    "s3.ap-southeast-1.amazonaws.com/exotelrecordings/",
    "exotelrecordings.s3.amazonaws.com",
    "exotelrecordings.s3.ap-southeast-1.amazonaws.com",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// The host or any subdomain of it.
    Suffix(String),
    /// Exactly this host, paths starting with the prefix (which starts and ends with `/`).
    HostPath(String, String),
}

/// A parsed allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    rules: Vec<Rule>,
    loopback_http: bool,
}

impl AllowList {
    /// Parse configured entries.
    ///
    /// # Errors
    /// An entry that is empty, carries a scheme, port or query, or is not a plain host name.
    pub fn parse(entries: &[String], loopback_http: bool) -> anyhow::Result<Self> {
        let mut rules = Vec::with_capacity(entries.len());
        for raw in entries {
            let e = raw.trim().to_ascii_lowercase();
            if e.is_empty() || e.contains("://") || e.contains(['?', '#', '@', ':', '*']) {
                bail!(
                    "recording host {raw:?} must be a host name, optionally followed by a path \
                     prefix (no scheme, port, wildcard or query)"
                );
            }
            let (host, path) = match e.split_once('/') {
                Some((h, p)) => (h.to_owned(), Some(format!("/{}", p.trim_end_matches('/')))),
                None => (e.clone(), None),
            };
            let host = host.trim_start_matches('.').to_owned();
            // A host that a URL parser accepts as a domain, with at least one dot, so a bare
            // `com` cannot allow everything.
            match Host::parse(&host).with_context(|| format!("recording host {raw:?}"))? {
                Host::Domain(d) if d == host && host.contains('.') => {}
                _ => bail!("recording host {raw:?} must be a domain name like exotel.com"),
            }
            rules.push(match path {
                Some(p) if p.len() > 1 => Rule::HostPath(host, format!("{p}/")),
                // `host/`: exactly this host, any path.
                Some(p) => Rule::HostPath(host, p),
                None => Rule::Suffix(host),
            });
        }
        Ok(Self {
            rules,
            loopback_http,
        })
    }

    /// Whether `url` may be fetched with a tenant's credentials.
    ///
    /// # Errors
    /// Why it may not (for the log and the 502 message; never echoes credentials).
    pub fn check(&self, url: &str) -> Result<Url, String> {
        let u = Url::parse(url).map_err(|_| "the stored recording URL is not a URL".to_owned())?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err("the recording URL carries credentials".into());
        }
        let loopback = matches!(u.host(), Some(Host::Ipv4(ip)) if ip.is_loopback() && ip.octets() == [127, 0, 0, 1]);
        match u.scheme() {
            "https" => {}
            "http" if loopback && self.loopback_http => return Ok(u),
            _ => return Err(format!("recording URLs must be https, not {}", u.scheme())),
        }
        if loopback && self.loopback_http {
            return Ok(u);
        }
        let Some(Host::Domain(host)) = u.host() else {
            return Err("the recording host is not allow-listed".into());
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let path = u.path();
        let allowed = self.rules.iter().any(|r| match r {
            Rule::Suffix(s) => {
                host == *s
                    || (host.len() > s.len()
                        && host.ends_with(s.as_str())
                        && host.as_bytes()[host.len() - s.len() - 1] == b'.')
            }
            Rule::HostPath(h, prefix) => host == *h && path.starts_with(prefix.as_str()),
        });
        if allowed {
            Ok(u)
        } else {
            Err(format!("the recording host {host} is not allow-listed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> AllowList {
        let v: Vec<String> = DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect();
        AllowList::parse(&v, false).unwrap()
    }

    #[test]
    fn exotel_hosts_and_the_bucket_are_allowed() {
        let a = defaults();
        for ok in [
            "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/acme1/x.mp3",
            "https://s3.ap-southeast-1.amazonaws.com/exotelrecordings/acme1/x.mp3?X-Amz-Signature=1",
            "https://exotelrecordings.s3.amazonaws.com/acme1/x.mp3",
            "https://recordings.exotel.com/acme1/x.mp3",
            "https://exotel.in/x.mp3",
            "https://api.in.exotel.com/v1/Accounts/a/Calls/b/Recording",
            "https://RECORDINGS.Exotel.COM./x.mp3",
        ] {
            assert!(a.check(ok).is_ok(), "{ok} should be allowed");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        let a = defaults();
        for bad in [
            "http://recordings.exotel.com/x.mp3",
            "https://exotel.com.evil.net/x.mp3",
            "https://notexotel.com/x.mp3",
            "https://s3-ap-southeast-1.amazonaws.com/otherbucket/x.mp3",
            "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings-evil/x.mp3",
            "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/../otherbucket/x.mp3",
            "https://s3-ap-southeast-1.amazonaws.com/exotelrecordings/%2e%2e/otherbucket/x.mp3",
            "https://evil-bucket.s3.amazonaws.com/x.mp3",
            "https://user:pw@recordings.exotel.com/x.mp3",
            "https://127.0.0.1/x.mp3",
            "http://127.0.0.1:8080/x.mp3",
            "ftp://exotel.com/x.mp3",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(a.check(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn loopback_http_only_when_configured_and_only_127_0_0_1() {
        let a = AllowList::parse(&[], true).unwrap();
        assert!(a.check("http://127.0.0.1:4321/r.mp3").is_ok());
        assert!(a.check("http://localhost:4321/r.mp3").is_err());
        assert!(a.check("http://127.0.0.2:4321/r.mp3").is_err());
        assert!(a.check("http://[::1]:4321/r.mp3").is_err());
        assert!(a.check("http://10.0.0.1/r.mp3").is_err());
    }

    #[test]
    fn bad_entries_are_refused_at_start() {
        for bad in [
            "",
            "com",
            "https://exotel.com",
            "exotel.com:443",
            "*.exotel.com",
            "1.2.3.4",
        ] {
            assert!(
                AllowList::parse(&[bad.to_owned()], false).is_err(),
                "{bad:?} should not parse"
            );
        }
        assert!(AllowList::parse(&["Exotel.com".into(), "h.example/a/b".into()], false).is_ok());
    }
}
