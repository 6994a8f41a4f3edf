//! The network as the user's environment describes it: which proxy a URL goes
//! through and which certificate authorities are trusted.
//!
//! Owns: reading `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY` (lower or upper
//! case, lower first, as curl reads them) and the trust store (the system's, or
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as OpenSSL, curl and Python do).
//!
//! Invariants kept: a URL's proxy depends only on its scheme and host (https →
//! `https_proxy`, http → `http_proxy`, either falls back to `all_proxy`; a host on
//! `no_proxy` goes direct); a proxy variable that is set but unusable is an error
//! naming the variable, never silently ignored (it would send traffic around a proxy
//! the user relies on).

use crate::error::{Error, Result};

/// The proxies of the environment, by target scheme.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    /// For `http://` targets: (variable name, proxy).
    pub http: Option<(String, ureq::Proxy)>,
    /// For `https://` targets.
    pub https: Option<(String, ureq::Proxy)>,
    no_proxy: Vec<String>,
}

/// The first of `names` set to a non-empty value, with its name.
fn first_set(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (n.to_string(), v.trim().to_string()))
    })
}

fn parse_proxy(var: (String, String)) -> Result<(String, ureq::Proxy)> {
    let (name, value) = var;
    let proxy = ureq::Proxy::new(&value).map_err(|e| {
        Error::Usage(format!(
            "{name}={value:?} is not a proxy URL stack can use ({e}); \
             give http://host:port, https://host:port or socks5://host:port"
        ))
    })?;
    Ok((name, proxy))
}

impl Proxies {
    /// Read the proxy variables.
    pub fn from_env() -> Result<Proxies> {
        let all = ["all_proxy", "ALL_PROXY"];
        let http = first_set(&["http_proxy", "HTTP_PROXY"]).or_else(|| first_set(&all));
        let https = first_set(&["https_proxy", "HTTPS_PROXY"]).or_else(|| first_set(&all));
        let no_proxy = first_set(&["no_proxy", "NO_PROXY"])
            .map(|(_, v)| no_proxy_entries(&v))
            .unwrap_or_default();
        Ok(Proxies {
            http: http.map(parse_proxy).transpose()?,
            https: https.map(parse_proxy).transpose()?,
            no_proxy,
        })
    }

    /// No proxy at all.
    pub fn none() -> Proxies {
        Proxies::default()
    }

    /// The proxy a request to `scheme://host` goes through, if any.
    pub fn for_target(&self, scheme: &str, host: &str) -> Option<&(String, ureq::Proxy)> {
        if self.bypass(host) {
            return None;
        }
        match scheme {
            "https" => self.https.as_ref(),
            _ => self.http.as_ref(),
        }
    }

    /// Is `host` on the `no_proxy` list? An entry matches the host itself and every
    /// name under it (`example.com` and `.example.com` both match `a.example.com`);
    /// `*` matches everything.
    fn bypass(&self, host: &str) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.no_proxy.iter().any(|e| {
            e == "*"
                || host == *e
                || (host.len() > e.len()
                    && host.ends_with(e.as_str())
                    && host.as_bytes()[host.len() - e.len() - 1] == b'.')
        })
    }
}

/// `no_proxy` entries, lowercased, without a leading `*.` or `.`, brackets or port.
fn no_proxy_entries(v: &str) -> Vec<String> {
    v.split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let e = e.to_ascii_lowercase();
            if e == "*" {
                return e;
            }
            let e = e.trim_start_matches("*.").trim_start_matches('.');
            let e = match e.strip_prefix('[') {
                Some(rest) => rest.split(']').next().unwrap_or(rest).to_string(),
                // host:port, but not a bare IPv6 address
                None if e.matches(':').count() == 1 => e.split(':').next().unwrap_or(e).to_string(),
                None => e.to_string(),
            };
            e
        })
        .collect()
}

/// The certificate authorities to trust: the system's store, or the files named by
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set. Falls back to the bundled
/// Mozilla roots only when no certificate at all could be loaded (a minimal
/// container without a CA bundle).
pub fn trust_roots() -> Result<ureq::tls::RootCerts> {
    let found = rustls_native_certs::load_native_certs();
    let named = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if found.certs.is_empty() {
        if let Some(var) = named {
            // The user pointed at certificates that are not there: say so rather
            // than fall back to roots that would not trust their server anyway.
            let why = found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no PEM certificate found".to_string());
            return Err(Error::Usage(format!(
                "{var}: no CA certificate could be loaded: {why}"
            )));
        }
        return Ok(ureq::tls::RootCerts::WebPki);
    }
    let certs = found
        .certs
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    Ok(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_no_proxy(v: &str) -> Proxies {
        Proxies {
            no_proxy: no_proxy_entries(v),
            ..Proxies::default()
        }
    }

    #[test]
    fn no_proxy_matches_hosts_and_their_subdomains() {
        let p = with_no_proxy("example.com, .internal ,10.0.0.1:8080,[::1],*.corp.test");
        assert!(p.bypass("example.com"));
        assert!(p.bypass("a.example.com"));
        assert!(!p.bypass("badexample.com"));
        assert!(p.bypass("x.internal"));
        assert!(p.bypass("10.0.0.1"));
        assert!(p.bypass("[::1]"));
        assert!(p.bypass("B.Corp.Test"));
        assert!(!p.bypass("corp.testing"));
        assert!(with_no_proxy("*").bypass("anything"));
        assert!(!with_no_proxy("").bypass("anything"));
    }
}
