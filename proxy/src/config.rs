//! The proxy's settings, from the environment (the agent's own come from its `ROOTSCALE_*` variables):
//!
//! | variable | what | default |
//! |---|---|---|
//! | `ROOTSCALE_PROXY_APP` | where the application listens | `127.0.0.1:8080` |
//! | `ROOTSCALE_PROXY_INBOUND` | where callers reach the application through the proxy | `0.0.0.0:4143` |
//! | `ROOTSCALE_PROXY_OUTBOUND` | the HTTP proxy port the application calls through (`HTTP_PROXY`); loopback only | `127.0.0.1:4140` |
//! | `ROOTSCALE_PROXY_ROUTES` | callees by name: `name=host:port,…` | none: a call goes where its authority says |
//! | `ROOTSCALE_PROXY_CALLEE_PORTS` | a local port per routed callee, for HTTP/2 and gRPC clients that dial one address per callee: `name=127.0.0.1:port,…`; loopback only | none |
//! | `ROOTSCALE_PROXY_MAX_OPEN` | inbound requests tracked at once for correlation | `65536` |
//!
//! Values are untrusted: parsed strictly, bounded, and a bad one is an error that names its variable.

use std::{collections::BTreeMap, net::SocketAddr};

use http::uri::Authority;
use rootscale_tracer::measure::headers::valid_service_name;

use crate::Error;

/// Where the application listens unless told otherwise.
pub const DEFAULT_APP: &str = "127.0.0.1:8080";
/// The inbound port's default.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:4143";
/// The outbound (HTTP proxy) port's default.
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:4140";
/// Inbound requests tracked at once unless told otherwise.
pub const DEFAULT_MAX_OPEN: usize = 65_536;
/// The most routes a proxy takes.
pub const MAX_ROUTES: usize = 256;
const MAX_MAX_OPEN: usize = 1 << 22;

/// Callees by name, and the authority each is reached at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(BTreeMap<String, Authority>);

/// Where an outbound call goes and what it is recorded as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The callee's service name (`None`: the tracer names it from its answer, or after its `host-port`).
    pub name: Option<String>,
    pub upstream: Authority,
}

impl Routes {
    /// `name=host:port,…`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut routes = BTreeMap::new();
        for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            let (name, upstream) =
                entry.split_once('=').ok_or_else(|| format!("route `{entry}` is not name=host:port"))?;
            if !valid_service_name(name) {
                return Err(format!("route `{entry}`: `{name}` is not a service name"));
            }
            let upstream: Authority =
                upstream.parse().map_err(|_| format!("route `{entry}`: `{upstream}` is not host:port"))?;
            if upstream.port_u16().is_none() {
                return Err(format!("route `{entry}`: `{upstream}` has no port"));
            }
            if routes.insert(name.to_string(), upstream).is_some() {
                return Err(format!("route `{entry}`: `{name}` is routed twice"));
            }
            if routes.len() > MAX_ROUTES {
                return Err(format!("more than {MAX_ROUTES} routes"));
            }
        }
        Ok(Self(routes))
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<Route> {
        self.0.get(name).map(|upstream| Route { name: Some(name.to_string()), upstream: upstream.clone() })
    }

    /// A route for one callee.
    pub fn with(mut self, name: &str, upstream: Authority) -> Result<Self, String> {
        if !valid_service_name(name) {
            return Err(format!("`{name}` is not a service name"));
        }
        self.0.insert(name.to_string(), upstream);
        Ok(self)
    }

    /// Where a call to `authority` goes: a route named like its host, or whose upstream it is; otherwise the
    /// authority itself, named after its host's first label when that is a service name (`payments.shop:8080`
    /// is `payments`).
    pub fn resolve(&self, authority: &Authority) -> Route {
        if let Some((name, upstream)) = self.0.get_key_value(authority.host()) {
            return Route { name: Some(name.clone()), upstream: upstream.clone() };
        }
        if let Some((name, upstream)) = self.0.iter().find(|(_, upstream)| *upstream == authority) {
            return Route { name: Some(name.clone()), upstream: upstream.clone() };
        }
        let host = authority.host();
        let label = host.split('.').next().unwrap_or(host);
        let is_ip = host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
        let name = (!is_ip && valid_service_name(label)).then(|| label.to_string());
        Route { name, upstream: authority.clone() }
    }
}

/// The proxy's settings.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub app: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub routes: Routes,
    /// A local port per callee (each a route): every call made to it goes to that callee.
    pub callee_ports: BTreeMap<String, SocketAddr>,
    pub max_open: usize,
}

impl ProxyConfig {
    /// The defaults, with the application at `app`.
    pub fn new(app: SocketAddr) -> Self {
        Self {
            app,
            inbound: parse_default(DEFAULT_INBOUND),
            outbound: parse_default(DEFAULT_OUTBOUND),
            routes: Routes::default(),
            callee_ports: BTreeMap::new(),
            max_open: DEFAULT_MAX_OPEN,
        }
    }

    /// The defaults, then the `ROOTSCALE_PROXY_*` environment.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`ProxyConfig::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let address = |name: &str, default: &str| -> Result<SocketAddr, Error> {
            let text = lookup(name).unwrap_or_else(|| default.to_string());
            text.trim().parse().map_err(|_| Error::Config(format!("{name}=`{text}`: expected ip:port")))
        };
        let mut config = Self::new(address("ROOTSCALE_PROXY_APP", DEFAULT_APP)?);
        config.inbound = address("ROOTSCALE_PROXY_INBOUND", DEFAULT_INBOUND)?;
        config.outbound = address("ROOTSCALE_PROXY_OUTBOUND", DEFAULT_OUTBOUND)?;
        if let Some(routes) = lookup("ROOTSCALE_PROXY_ROUTES") {
            config.routes =
                Routes::parse(&routes).map_err(|e| Error::Config(format!("ROOTSCALE_PROXY_ROUTES: {e}")))?;
        }
        if let Some(ports) = lookup("ROOTSCALE_PROXY_CALLEE_PORTS") {
            for entry in ports.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
                let bad = |why: &str| Error::Config(format!("ROOTSCALE_PROXY_CALLEE_PORTS: `{entry}` {why}"));
                let (name, addr) = entry.split_once('=').ok_or_else(|| bad("is not name=ip:port"))?;
                let addr: SocketAddr = addr.parse().map_err(|_| bad("does not end in ip:port"))?;
                if config.callee_ports.insert(name.to_string(), addr).is_some() {
                    return Err(bad("names a callee twice"));
                }
            }
        }
        if let Some(max_open) = lookup("ROOTSCALE_PROXY_MAX_OPEN") {
            config.max_open =
                max_open.trim().parse().ok().filter(|n| (1..=MAX_MAX_OPEN).contains(n)).ok_or_else(|| {
                    Error::Config(format!("ROOTSCALE_PROXY_MAX_OPEN=`{max_open}`: expected 1 to {MAX_MAX_OPEN}"))
                })?;
        }
        config.check()?;
        Ok(config)
    }

    /// The outbound port takes the application's calls only: it must not be reachable from elsewhere, or it would
    /// be an open proxy into the cluster.
    pub fn check(&self) -> Result<(), Error> {
        if !self.outbound.ip().is_loopback() {
            return Err(Error::Config(format!(
                "ROOTSCALE_PROXY_OUTBOUND={}: the outbound port must be on loopback",
                self.outbound
            )));
        }
        if self.callee_ports.len() > MAX_ROUTES {
            return Err(Error::Config(format!("ROOTSCALE_PROXY_CALLEE_PORTS: more than {MAX_ROUTES}")));
        }
        for (name, addr) in &self.callee_ports {
            if self.routes.get(name).is_none() {
                return Err(Error::Config(format!(
                    "ROOTSCALE_PROXY_CALLEE_PORTS: `{name}` has no route in ROOTSCALE_PROXY_ROUTES"
                )));
            }
            if !addr.ip().is_loopback() {
                return Err(Error::Config(format!("ROOTSCALE_PROXY_CALLEE_PORTS: {name}={addr} is not on loopback")));
            }
        }
        Ok(())
    }
}

fn parse_default(text: &str) -> SocketAddr {
    // The defaults are constants written above; a test parses each.
    text.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_parse() {
        for text in [DEFAULT_APP, DEFAULT_INBOUND, DEFAULT_OUTBOUND] {
            assert!(text.parse::<SocketAddr>().is_ok(), "{text}");
        }
        let config = ProxyConfig::from_lookup(|_| None).unwrap();
        assert_eq!(config.app.to_string(), DEFAULT_APP);
        assert_eq!(config.outbound.to_string(), DEFAULT_OUTBOUND);
    }

    #[test]
    fn settings_are_parsed_strictly_and_errors_name_the_variable() {
        let with =
            |name: &'static str, value: &'static str| move |asked: &str| (asked == name).then(|| value.to_string());
        for (name, value, why) in [
            ("ROOTSCALE_PROXY_APP", "localhost", "ROOTSCALE_PROXY_APP=`localhost`: expected ip:port"),
            ("ROOTSCALE_PROXY_OUTBOUND", "0.0.0.0:4140", "must be on loopback"),
            ("ROOTSCALE_PROXY_ROUTES", "svc-c", "is not name=host:port"),
            ("ROOTSCALE_PROXY_ROUTES", "Svc C=127.0.0.1:1", "is not a service name"),
            ("ROOTSCALE_PROXY_ROUTES", "svc-c=127.0.0.1", "has no port"),
            ("ROOTSCALE_PROXY_ROUTES", "svc-c=127.0.0.1:1,svc-c=127.0.0.1:2", "routed twice"),
            ("ROOTSCALE_PROXY_MAX_OPEN", "0", "ROOTSCALE_PROXY_MAX_OPEN=`0`"),
            ("ROOTSCALE_PROXY_CALLEE_PORTS", "svc-c=127.0.0.1:15001", "`svc-c` has no route"),
            ("ROOTSCALE_PROXY_CALLEE_PORTS", "svc-c", "is not name=ip:port"),
        ] {
            let error = ProxyConfig::from_lookup(with(name, value)).unwrap_err().to_string();
            assert!(error.contains(why), "{name}={value}: {error}");
        }
    }

    #[test]
    fn a_call_is_named_by_its_route_or_its_host() {
        let routes = Routes::parse("svc-c=127.0.0.1:9001, payments=127.0.0.2:80").unwrap();
        let resolve = |authority: &str| routes.resolve(&authority.parse().unwrap());
        assert_eq!(resolve("svc-c"), Route { name: Some("svc-c".into()), upstream: "127.0.0.1:9001".parse().unwrap() });
        assert_eq!(resolve("127.0.0.2:80").name.as_deref(), Some("payments"));
        let unrouted = resolve("cart.shop.svc:8080");
        assert_eq!((unrouted.name.as_deref(), unrouted.upstream.as_str()), (Some("cart"), "cart.shop.svc:8080"));
        assert_eq!(resolve("127.0.0.9:80").name, None, "an address names no service");
    }
}
