//! The one typed configuration, read from a TOML file, `config.d/*.toml` drop-ins and a few
//! per-box environment overrides.
//!
//! Architecture Invariant: this is the only module that reads configuration files or the
//! environment. Each section of [`Config`] belongs to one component, which receives only that
//! section. Values are parsed into types that cannot hold invalid states here, at the edge, so
//! that every error can name the file, line and key it came from.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The main configuration file when neither `--config` nor `MESHKEEP_CONFIG` names one.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/meshkeep";
/// The file name of the main configuration file inside a configuration directory.
pub const CONFIG_FILE_NAME: &str = "config.toml";
/// The drop-in directory next to the main configuration file.
pub const DROP_IN_DIR_NAME: &str = "config.d";
/// State directory when a configuration file exists but does not name one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshkeep";
/// State directory of the embedded default (no configuration file at all), relative to the
/// working directory so that a newcomer's first run needs no root.
pub const EMBEDDED_STATE_DIR: &str = ".meshkeep";
/// The manifest folder inside a configuration directory.
pub const MANIFESTS_DIR_NAME: &str = "manifests";
/// The manifest folder of the built-in default, relative to the working directory: the example
/// site shipped in the repository.
pub const EMBEDDED_MANIFESTS: &str = "examples/site";

/// Environment variables that override one key each, applied in this order (later wins).
///
/// `STATE_DIRECTORY` and `CONFIGURATION_DIRECTORY` are set by systemd from the unit's
/// `StateDirectory=` and `ConfigurationDirectory=`.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("STATE_DIRECTORY", "store.state_dir"),
    ("MESHKEEP_STATE_DIR", "store.state_dir"),
    ("MESHKEEP_WORKERS", "runtime.workers"),
    ("MESHKEEP_NODE_NAME", "node.name"),
    ("MESHKEEP_NODE_ZONE", "node.zone"),
    ("MESHKEEP_ADMIN_LISTEN", "admin.listen"),
    ("MESHKEEP_PROXY_OUTBOUND_LISTEN", "proxy.outbound_listen"),
    ("MESHKEEP_PROXY_INBOUND_LISTEN", "proxy.inbound_listen"),
    ("MESHKEEP_DNS_LISTEN", "dns.listen"),
    ("MESHKEEP_LOG", "log.filter"),
];

/// The whole configuration. Its sections mirror the components.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub runtime: RuntimeConfig,
    pub node: NodeConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub upstream: UpstreamConfig,
    pub discovery: DiscoveryConfig,
    pub identity: IdentityConfig,
    pub proxy: ProxyConfig,
    pub redirect: RedirectConfig,
    pub dns: DnsConfig,
    pub traffic: TrafficConfig,
    pub policy: PolicyConfig,
    pub log: LogConfig,
}

/// The Tokio runtime and process lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Worker threads: `"auto"` (one per available core) or a positive count.
    pub workers: Workers,
    /// How long a shutdown waits for open connections to finish before exiting anyway.
    pub drain_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { workers: Workers::Auto, drain_timeout: Duration::from_secs(10) }
    }
}

/// Where this box sits: used for topology-aware routing and shown in status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The node name; the machine's host name when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    /// The zone (`topology.kubernetes.io/zone`) this box is in, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<Name>,
}

/// The admin HTTP endpoint (/live, /ready, /metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 4191)) }
    }
}

/// The local store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The state directory (store file, identity material). Always set after loading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Changes are committed to disk at most this often (bounds flash wear).
    pub flush_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { state_dir: None, flush_interval: Duration::from_secs(1) }
    }
}

/// Where objects come from: a local manifest folder and upstream cluster links.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub local: LocalConfig,
    /// Upstream Kubernetes clusters, by link name.
    pub links: BTreeMap<LinkName, LinkConfig>,
}

/// The local manifest folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// The folder of YAML manifests. When unset: `manifests/` in the configuration directory
    /// (or `examples/site` under the built-in default) if it exists; otherwise no local source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// How often the folder is checked for changes.
    pub poll_interval: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self { path: None, poll_interval: Duration::from_secs(2) }
    }
}

/// A link name: a DNS label, because mirrored services are named `<service>-<link>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkName(String);

impl LinkName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LinkName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for LinkName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if valid { Ok(Self(s.to_owned())) } else { Err(format!("link name {s:?} must be a DNS label (a-z, 0-9, '-')")) }
    }
}

/// How a link's services are named locally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkMode {
    /// Served as `<service>-<link>` (Linkerd's multicluster convention), and under the plain
    /// name when no local or federated source has that service.
    #[default]
    Mirror,
    /// Merged into the plain name with the local source and other federated links.
    Federated,
}

/// One upstream Kubernetes cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawLinkConfig", into = "RawLinkConfig")]
pub struct LinkConfig {
    pub access: LinkAccess,
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    pub mode: LinkMode,
    /// Where the identity issuer Secret and trust-roots ConfigMap live.
    pub control_plane_namespace: String,
    pub issuer_secret: String,
    pub trust_roots_configmap: String,
    /// Objects per list page.
    pub page_size: u32,
    /// The largest response read from the API server: a list page (or any other answer that is
    /// not a watch stream) and each single event of a watch stream. A larger one fails, is
    /// reported as the link's error and retried with backoff; the store keeps serving.
    pub max_response_size: ByteSize,
}

/// How to reach and authenticate to a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAccess {
    Kubeconfig { path: PathBuf, context: Option<String> },
    Server { url: String, token_file: Option<PathBuf>, ca_file: Option<PathBuf> },
}

/// The file form of a link, checked into [`LinkConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLinkConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubeconfig: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    mode: LinkMode,
    #[serde(default = "default_control_plane_namespace")]
    control_plane_namespace: String,
    #[serde(default = "default_issuer_secret")]
    issuer_secret: String,
    #[serde(default = "default_trust_roots")]
    trust_roots_configmap: String,
    #[serde(default = "default_page_size")]
    page_size: u32,
    #[serde(default = "default_max_response_size")]
    max_response_size: ByteSize,
}

fn default_control_plane_namespace() -> String {
    "linkerd".into()
}
fn default_issuer_secret() -> String {
    "linkerd-identity-issuer".into()
}
fn default_trust_roots() -> String {
    "linkerd-identity-trust-roots".into()
}
fn default_page_size() -> u32 {
    500
}
fn default_max_response_size() -> ByteSize {
    ByteSize::from_mib(64)
}

/// The smallest `max_response_size`: below it even a short list page would not fit.
const MIN_RESPONSE_SIZE: ByteSize = ByteSize::from_kib(64);

impl TryFrom<RawLinkConfig> for LinkConfig {
    type Error = String;

    fn try_from(raw: RawLinkConfig) -> Result<Self, Self::Error> {
        let access = match (raw.kubeconfig, raw.server) {
            (Some(path), None) => {
                if raw.token_file.is_some() || raw.ca_file.is_some() {
                    return Err("token_file and ca_file go with server, not with kubeconfig".into());
                }
                LinkAccess::Kubeconfig { path, context: raw.context }
            }
            (None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(format!("server {url:?} must be an http:// or https:// URL"));
                }
                if raw.context.is_some() {
                    return Err("context goes with kubeconfig, not with server".into());
                }
                LinkAccess::Server { url, token_file: raw.token_file, ca_file: raw.ca_file }
            }
            (Some(_), Some(_)) => return Err("a link takes either kubeconfig or server, not both".into()),
            (None, None) => return Err("a link needs kubeconfig = \"PATH\" or server = \"https://...\"".into()),
        };
        if raw.page_size == 0 {
            return Err("page_size must be at least 1".into());
        }
        if raw.max_response_size < MIN_RESPONSE_SIZE {
            return Err(format!("max_response_size must be at least {MIN_RESPONSE_SIZE}"));
        }
        Ok(Self {
            access,
            namespaces: raw.namespaces,
            mode: raw.mode,
            control_plane_namespace: raw.control_plane_namespace,
            issuer_secret: raw.issuer_secret,
            trust_roots_configmap: raw.trust_roots_configmap,
            page_size: raw.page_size,
            max_response_size: raw.max_response_size,
        })
    }
}

impl From<LinkConfig> for RawLinkConfig {
    fn from(link: LinkConfig) -> Self {
        let (kubeconfig, context, server, token_file, ca_file) = match link.access {
            LinkAccess::Kubeconfig { path, context } => (Some(path), context, None, None, None),
            LinkAccess::Server { url, token_file, ca_file } => (None, None, Some(url), token_file, ca_file),
        };
        Self {
            kubeconfig,
            context,
            server,
            token_file,
            ca_file,
            namespaces: link.namespaces,
            mode: link.mode,
            control_plane_namespace: link.control_plane_namespace,
            issuer_secret: link.issuer_secret,
            trust_roots_configmap: link.trust_roots_configmap,
            page_size: link.page_size,
            max_response_size: link.max_response_size,
        }
    }
}

/// Discovery: how mesh names are formed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// The cluster DNS domain (`svc.ns.svc.<cluster_domain>`).
    pub cluster_domain: String,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self { cluster_domain: "cluster.local".into() }
    }
}

impl StoreConfig {
    /// The state directory; loading always resolves it.
    pub fn state_dir(&self) -> &Path {
        self.state_dir.as_deref().unwrap_or(Path::new(DEFAULT_STATE_DIR))
    }
}

/// Identity: names, certificate lifetimes, where the issuer comes from, who gets certificates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// The trust domain in identity names and SPIFFE IDs.
    pub trust_domain: String,
    /// The control-plane namespace in identity names.
    pub control_plane_namespace: String,
    /// Lifetime of workload certificates.
    pub certificate_lifetime: Duration,
    /// Renew when this fraction of a certificate's lifetime has passed.
    pub renew_fraction: Fraction,
    /// NotBefore is backdated by this much for peers whose clocks run slightly behind.
    pub clock_skew: Duration,
    /// Warn (status, metrics) when the issuer expires within this window.
    pub issuer_expiry_warning: Duration,
    /// With no issuer configured or synced, create a local root and issuer.
    pub standalone: bool,
    pub standalone_lifetime: Duration,
    /// Issuer from files instead of a source: certificate (chain), key and trust anchors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer_certificate: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_anchors: Option<PathBuf>,
    /// The local API socket; `$RUNTIME_DIRECTORY/identity.sock` under systemd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The box's own proxy identity.
    pub proxy: ServiceAccount,
    /// Local workloads, by name: the uid that may ask for the identity over the socket, and
    /// optionally a directory kept up to date with tls.crt, tls.key and ca.crt.
    pub workloads: BTreeMap<String, WorkloadConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            control_plane_namespace: "linkerd".into(),
            certificate_lifetime: Duration::from_secs(24 * 3600),
            renew_fraction: Fraction(0.7),
            clock_skew: Duration::from_secs(60),
            issuer_expiry_warning: Duration::from_secs(30 * 86400),
            standalone: true,
            standalone_lifetime: Duration::from_secs(365 * 86400),
            issuer_certificate: None,
            issuer_key: None,
            trust_anchors: None,
            socket: None,
            proxy: ServiceAccount { namespace: "meshkeep".into(), service_account: "meshkeep".into() },
            workloads: BTreeMap::new(),
        }
    }
}

/// A namespaced service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    pub namespace: String,
    pub service_account: String,
}

/// A local workload that gets an identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub uid: u32,
    pub namespace: String,
    pub service_account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
}

/// A number between 0.1 and 0.95 (renewal points).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fraction(f64);

impl Fraction {
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Serialize for Fraction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if (0.1..=0.95).contains(&value) {
            Ok(Self(value))
        } else {
            Err(serde::de::Error::custom(format!("expected a fraction between 0.1 and 0.95, got {value}")))
        }
    }
}

/// The proxy: outbound and inbound listeners and their limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub enabled: bool,
    /// Where redirected outbound connections arrive (iptables/nftables REDIRECT target).
    pub outbound_listen: SocketAddr,
    /// Where peers' mTLS connections arrive.
    pub inbound_listen: SocketAddr,
    /// The port peers' inbound proxies listen on.
    pub peer_inbound_port: u16,
    /// Inbound connections are forwarded to this address and the target port.
    pub inbound_target: std::net::IpAddr,
    /// What to do with plaintext reaching the inbound port (refuse until policy says otherwise).
    pub inbound_plaintext: PlaintextPolicy,
    /// How long a client may take to send its first bytes.
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long an HTTP/1 client may take to send a request's headers (slow clients are cut).
    pub header_read_timeout: Duration,
    /// An opaque TCP connection with no bytes either way for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// An HTTP connection with no bytes for this long is closed gracefully (requests in flight
    /// finish first).
    pub http_idle_timeout: Duration,
    /// Open connections per direction; also each proxy listener's accept queue (capped by the
    /// kernel at net.core.somaxconn).
    pub max_connections: usize,
    /// Ports whose traffic is never protocol-detected (Linkerd's defaults).
    pub opaque_ports: Vec<u16>,
    /// Ports forwarded unchanged, without the mesh.
    pub skip_ports: Vec<u16>,
    /// Explicit outbound listeners for boxes that cannot redirect.
    pub listeners: Vec<ListenerConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            outbound_listen: SocketAddr::from(([127, 0, 0, 1], 4140)),
            inbound_listen: SocketAddr::from(([0, 0, 0, 0], 4143)),
            peer_inbound_port: 4143,
            inbound_target: std::net::IpAddr::from([127, 0, 0, 1]),
            inbound_plaintext: PlaintextPolicy::Refuse,
            detect_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(3),
            header_read_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(3600),
            http_idle_timeout: Duration::from_secs(90),
            max_connections: 10_000,
            opaque_ports: vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211],
            skip_ports: Vec::new(),
            listeners: Vec::new(),
        }
    }
}

/// How requests are spread, retried and timed out (the proxy's client side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Time from sending a request to its response headers; past it the client gets 504.
    /// An HTTPRoute rule's `timeouts.request` overrides it.
    pub response_timeout: Duration,
    /// Retry idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) that fail with a 5xx
    /// or a connection error, on another endpoint.
    pub retries: bool,
    /// Retries on top of one try.
    pub max_retries: u32,
    /// Bodies up to this size are kept so the request can be replayed; larger ones are sent once.
    pub retry_body_limit: usize,
    /// The retry budget: retries may add this share of the requests...
    pub retry_budget_ratio: Ratio,
    /// ...plus this many per second...
    pub retry_budget_min_per_second: u32,
    /// ...over this window.
    pub retry_budget_window: Duration,
    /// Consecutive failures that eject an endpoint.
    pub failure_accrual: u32,
    pub ejection_backoff_min: Duration,
    pub ejection_backoff_max: Duration,
    /// Up to this share of each backoff is added or removed at random.
    pub ejection_jitter: Ratio,
    /// Latency assumed for an endpoint not yet measured (new endpoints are warmed in).
    pub ewma_default_rtt: Duration,
    /// How fast the latency estimate forgets.
    pub ewma_decay: Duration,
    /// Prefer endpoints on this node, then in this zone (EndpointSlice zones and hints).
    pub topology: bool,
    /// Per-service overrides, by mesh name (`api.shop`).
    pub services: BTreeMap<String, ServiceTraffic>,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_secs(10),
            retries: true,
            max_retries: 2,
            retry_body_limit: 64 * 1024,
            retry_budget_ratio: Ratio(0.2),
            retry_budget_min_per_second: 10,
            retry_budget_window: Duration::from_secs(10),
            failure_accrual: 7,
            ejection_backoff_min: Duration::from_secs(1),
            ejection_backoff_max: Duration::from_secs(60),
            ejection_jitter: Ratio(0.5),
            ewma_default_rtt: Duration::from_millis(30),
            ewma_decay: Duration::from_secs(10),
            topology: true,
            services: BTreeMap::new(),
        }
    }
}

/// Overrides for one service; unset keys keep the `[traffic]` value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceTraffic {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<bool>,
    /// Also retry non-idempotent methods (POST, PATCH): only for routes known to be safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_all_methods: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<bool>,
}

/// Who may reach this box's workloads when no TrafficTarget says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `all-authenticated` (any mesh identity), `all-unauthenticated`, `deny` or `audit`.
    pub default: crate::policy::authz::DefaultPolicy,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { default: crate::policy::authz::DefaultPolicy::AllAuthenticated }
    }
}

/// A share between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Ratio(pub f64);

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(serde::de::Error::custom(format!("expected a share between 0 and 1, got {value}")))
        }
    }
}

/// The DNS server for mesh names, answering from the store (so it keeps answering offline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    pub enabled: bool,
    /// UDP and TCP. Port 53 needs CAP_NET_BIND_SERVICE; systemd-resolved can route the cluster
    /// domain to any port (systemd/meshkeep-resolved.conf).
    pub listen: SocketAddr,
    /// TTL of mesh answers (and of negative answers, through the SOA minimum).
    pub ttl: Duration,
    /// Also answer `svc.ns` (as if `svc.ns.svc.<cluster domain>`), for clients without the
    /// cluster's search list.
    pub short_names: bool,
    /// Resolvers for every other name (`ip:port`, tried in order). None: other names are refused.
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for an upstream resolver before trying the next.
    pub upstream_timeout: Duration,
    /// Forwarded answers kept (by name and type), for at most their TTL.
    pub cache_entries: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 4153)),
            ttl: Duration::from_secs(5),
            short_names: true,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            cache_entries: 1024,
        }
    }
}

/// Transparent mode: which traffic `meshkeep redirect install` sends through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedirectConfig {
    /// Destinations of local clients' TCP that go to the outbound port.
    pub outbound_cidrs: Vec<String>,
    /// Destinations never redirected.
    pub exclude_cidrs: Vec<String>,
    /// Destination ports never redirected (SSH by default, so a box stays reachable).
    pub skip_outbound_ports: Vec<u16>,
    /// Local ports whose incoming TCP goes through the inbound proxy.
    pub inbound_ports: Vec<u16>,
    /// The user (name or uid) the daemon runs as: its own traffic is never redirected.
    pub proxy_user: String,
}

impl Default for RedirectConfig {
    fn default() -> Self {
        Self {
            outbound_cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            exclude_cidrs: vec!["127.0.0.0/8".into(), "::1/128".into()],
            skip_outbound_ports: vec![22],
            inbound_ports: Vec::new(),
            proxy_user: "meshkeep".into(),
        }
    }
}

/// Plaintext on the inbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextPolicy {
    Refuse,
    Accept,
}

/// An explicit outbound listener: connections to `listen` go to `service`'s `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// A mesh name such as `api.shop` or `api.shop.svc.cluster.local`.
    pub service: String,
    /// The service port; without it, the service's only port (a service with several refuses
    /// the connection, saying so in the log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `meshkeep=debug,kube=warn`.
    pub filter: LogFilter,
    /// Where logs go: `auto` (the journal when started by systemd, else stderr), `journald`
    /// or `stderr`.
    pub output: LogOutput,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: LogFilter("info".into()), output: LogOutput::Auto }
    }
}

/// The number of runtime worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// One worker per core available to the process.
    Auto,
    Count(NonZeroUsize),
}

impl Workers {
    /// The resolved worker count.
    pub fn count(self) -> usize {
        match self {
            Workers::Count(n) => n.get(),
            Workers::Auto => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        }
    }
}

impl FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(Workers::Auto);
        }
        s.parse::<NonZeroUsize>()
            .map(Workers::Count)
            .map_err(|_| format!("expected \"auto\" or a positive number of workers, got {s:?}"))
    }
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a positive number of workers")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Workers, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Workers::Count)
                    .ok_or_else(|| E::custom(format!("expected a positive number of workers, got {v}")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Workers, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Workers, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A span of time written as a number and a unit: `250ms`, `10s`, `5m`, `24h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a duration such as \"500ms\", \"10s\", \"5m\" or \"24h\", got {s:?}");
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        let millis = n.checked_mul(millis_per_unit).ok_or_else(|| format!("duration {s:?} is too long"))?;
        Ok(Self(std::time::Duration::from_millis(millis)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => f.write_str("0s"),
            ms if ms % 86_400_000 == 0 => write!(f, "{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => write!(f, "{}s", ms / 1_000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

/// An amount of memory: a number of bytes, or a number and a binary unit (`B`, `KiB`, `MiB`,
/// `GiB`), with or without a space: `65536`, `512KiB`, `64MiB`, `"1 MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

impl ByteSize {
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    pub const fn from_kib(kib: u64) -> Self {
        Self(kib * 1024)
    }

    pub const fn from_mib(mib: u64) -> Self {
        Self(mib * 1024 * 1024)
    }

    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected a size such as \"65536\", \"512KiB\", \"64MiB\" or \"1GiB\", got {s:?}");
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes_per_unit: u64 = match unit.strip_prefix(' ').unwrap_or(unit) {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(bytes_per_unit).map(Self).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly: `64 MiB`, `1536 KiB`, `100 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size such as \"64MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("expected a size in bytes, got {v}")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A non-empty name without whitespace or control characters (node names, zones).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 253 {
            return Err(format!("expected a name of 1 to 253 characters, got {s:?}"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("a name cannot contain spaces or control characters: {s:?}"));
        }
        Ok(Self(s.to_owned()))
    }
}

/// A validated `tracing` filter directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LogFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| Self(s.to_owned()))
            .map_err(|e| format!("not a valid log filter ({e}): {s:?}"))
    }
}

/// Where logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// The journal when stderr is connected to it (systemd sets `JOURNAL_STREAM`), else stderr.
    Auto,
    Journald,
    Stderr,
}

/// Implements string (de)serialisation through `FromStr` and `Display`/`as_str`.
macro_rules! string_serde {
    ($ty:ty, $to_string:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let to_string: fn(&$ty) -> String = $to_string;
                s.serialize_str(&to_string(self))
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(Duration, |d| d.to_string());
string_serde!(Name, |n| n.0.clone());
string_serde!(LogFilter, |l| l.0.clone());
string_serde!(LinkName, |l| l.0.clone());

/// A configuration error. Each names where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file named explicitly (flag or `MESHKEEP_CONFIG`) does not exist or
    /// cannot be read.
    #[error("{path}: cannot read configuration: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The drop-in directory exists but cannot be listed.
    #[error("{path}: cannot list drop-in directory: {source}")]
    DropInDir { path: PathBuf, source: io::Error },
    /// A file is not valid TOML, has an unknown key, or a key with a bad value.
    #[error("{path}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    File { path: PathBuf, line: usize, column: usize, key: Option<String>, message: String },
    /// An environment override has a bad value.
    #[error("environment variable {var} (overrides `{key}`): {message}")]
    Env { var: String, key: String, message: String },
    /// Keys that are valid one by one but not together.
    #[error("key `{key}`: {message} (in {})", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "))]
    Invalid { key: String, message: String, files: Vec<PathBuf> },
}

/// Where a configuration comes from: an optional explicit file plus the process environment.
///
/// Tests build one with [`Source::new`] instead of touching the real environment.
#[derive(Debug, Clone, Default)]
pub struct Source {
    explicit_file: Option<PathBuf>,
    env: BTreeMap<String, String>,
    hostname: Option<String>,
    working_dir: PathBuf,
}

/// A loaded configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The files read, in the order applied (main file first, then drop-ins).
    pub files: Vec<PathBuf>,
    /// True when no main configuration file exists and the built-in default is in force.
    pub embedded: bool,
    /// The environment variables that overrode a key.
    pub env_overrides: Vec<String>,
    /// What the service manager told the process, if it was started by one.
    pub service_manager: ServiceManager,
    /// The explicit configuration file (`--config`), for a reload to read the same one.
    pub reload_from: Option<PathBuf>,
    /// `credential:NAME` link files left unresolved because systemd passed no credentials
    /// (`key: why`): the daemon refuses to start with any; operator commands, which never read
    /// link secrets, run as usual.
    pub missing_credentials: Vec<String>,
}

/// What systemd passes a service through its environment.
#[derive(Debug, Clone, Default)]
pub struct ServiceManager {
    /// `NOTIFY_SOCKET`: where sd_notify messages go (`Type=notify`).
    pub notify_socket: Option<String>,
    /// Whether stderr is connected to the journal (`JOURNAL_STREAM` matches it).
    pub stderr_is_journal: bool,
    /// `WATCHDOG_USEC` (for this process): WATCHDOG=1 must arrive at least this often.
    pub watchdog: Option<std::time::Duration>,
}

impl Source {
    /// A source for tests: an explicit file (or none), an environment, and a working directory.
    pub fn new(
        explicit_file: Option<PathBuf>,
        env: impl IntoIterator<Item = (String, String)>,
        working_dir: PathBuf,
    ) -> Self {
        Self { explicit_file, env: env.into_iter().collect(), hostname: None, working_dir }
    }

    /// The source of a real process: its environment, host name and working directory.
    pub fn from_process(explicit_file: Option<PathBuf>) -> Self {
        let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
        let working_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        Self { explicit_file, env: std::env::vars().collect(), hostname, working_dir }
    }

    /// Reads, merges and validates the configuration.
    pub fn load(&self) -> Result<Loaded, Error> {
        let (main_file, config_dir) = self.locate();
        let mut files = Vec::new();
        let mut merged = toml::Table::new();

        if let Some(path) = &main_file {
            merge(&mut merged, read_file(path)?);
            files.push(path.clone());
        }
        for path in drop_ins(&config_dir.join(DROP_IN_DIR_NAME))? {
            merge(&mut merged, read_file(&path)?);
            files.push(path);
        }

        let mut env_overrides = Vec::new();
        for (var, key) in ENV_OVERRIDES {
            let Some(value) = self.env.get(*var) else { continue };
            // systemd passes a colon-separated list when a unit names several directories.
            let value = match *var {
                "STATE_DIRECTORY" => value.split(':').next().unwrap_or_default(),
                _ => value.as_str(),
            };
            set_key(&mut merged, key, toml::Value::String(value.to_owned()));
            typed(&merged).map_err(|(_, message)| Error::Env {
                var: (*var).to_owned(),
                key: (*key).to_owned(),
                message,
            })?;
            env_overrides.push((*var).to_owned());
        }

        let mut config = typed(&merged).map_err(|(key, message)| Error::File {
            path: files.last().cloned().unwrap_or_default(),
            line: 0,
            column: 0,
            key,
            message,
        })?;
        self.resolve_defaults(&mut config, main_file.is_none(), &config_dir);
        let missing_credentials = self.resolve_credentials(&mut config).map_err(|(key, message)| Error::Invalid {
            key,
            message,
            files: files.clone(),
        })?;
        config.validate().map_err(|(key, message)| Error::Invalid { key, message, files: files.clone() })?;
        let for_us = self.env.get("WATCHDOG_PID").is_none_or(|pid| pid.parse() == Ok(std::process::id()));
        let service_manager = ServiceManager {
            notify_socket: self.env.get("NOTIFY_SOCKET").cloned(),
            stderr_is_journal: self.stderr_is_journal(),
            watchdog: self
                .env
                .get("WATCHDOG_USEC")
                .and_then(|usec| usec.parse().ok())
                .filter(|usec| *usec > 0 && for_us)
                .map(std::time::Duration::from_micros),
        };
        let reload_from = self.explicit_file.clone();
        Ok(Loaded {
            config,
            files,
            embedded: main_file.is_none(),
            env_overrides,
            service_manager,
            reload_from,
            missing_credentials,
        })
    }

    /// Link secrets written `credential:NAME` are the files systemd's `LoadCredential=` put in
    /// `$CREDENTIALS_DIRECTORY`. Without that directory they stay unresolved and are returned.
    fn resolve_credentials(&self, config: &mut Config) -> Result<Vec<String>, (String, String)> {
        let directory = self.env.get("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let mut missing = Vec::new();
        for (name, link) in &mut config.upstream.links {
            let paths: Vec<(&str, &mut PathBuf)> = match &mut link.access {
                LinkAccess::Kubeconfig { path, .. } => vec![("kubeconfig", path)],
                LinkAccess::Server { token_file, ca_file, .. } => {
                    let mut paths = Vec::new();
                    if let Some(path) = token_file {
                        paths.push(("token_file", path));
                    }
                    if let Some(path) = ca_file {
                        paths.push(("ca_file", path));
                    }
                    paths
                }
            };
            for (key, path) in paths {
                let Some(credential) = path.to_str().and_then(|p| p.strip_prefix("credential:")) else { continue };
                let key = format!("upstream.links.{name}.{key}");
                if credential.is_empty() || credential.contains('/') {
                    return Err((key, format!("{credential:?} is not a credential name")));
                }
                match &directory {
                    Some(directory) => *path = directory.join(credential),
                    None => missing.push(format!(
                        "{key}: credential:{credential} needs systemd's LoadCredential= (CREDENTIALS_DIRECTORY is not set)"
                    )),
                }
            }
        }
        Ok(missing)
    }

    /// The main file (if any) and the directory whose `config.d/` holds drop-ins.
    fn locate(&self) -> (Option<PathBuf>, PathBuf) {
        let explicit = self.explicit_file.clone().or_else(|| self.env.get("MESHKEEP_CONFIG").map(PathBuf::from));
        if let Some(file) = explicit {
            let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
            return (Some(file), dir);
        }
        let dir = self
            .env
            .get("CONFIGURATION_DIRECTORY")
            .and_then(|dirs| dirs.split(':').next())
            .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_DIR), PathBuf::from);
        let file = dir.join(CONFIG_FILE_NAME);
        (file.exists().then_some(file), dir)
    }

    fn resolve_defaults(&self, config: &mut Config, embedded: bool, config_dir: &Path) {
        if config.node.name.is_none() {
            let host = self.hostname.as_deref().unwrap_or("localhost");
            config.node.name = host.parse().ok();
        }
        let state_dir = config
            .store
            .state_dir
            .take()
            .unwrap_or_else(|| PathBuf::from(if embedded { EMBEDDED_STATE_DIR } else { DEFAULT_STATE_DIR }));
        config.store.state_dir = Some(self.working_dir.join(state_dir));
        if config.identity.socket.is_none() {
            config.identity.socket = match self.env.get("RUNTIME_DIRECTORY").and_then(|d| d.split(':').next()) {
                Some(dir) => Some(PathBuf::from(dir).join("identity.sock")),
                None if embedded => None,
                None => Some(PathBuf::from("/run/meshkeep/identity.sock")),
            };
        }
        config.upstream.local.path = match config.upstream.local.path.take() {
            Some(path) => Some(self.working_dir.join(path)),
            None => {
                let candidate = if embedded {
                    self.working_dir.join(EMBEDDED_MANIFESTS)
                } else {
                    config_dir.join(MANIFESTS_DIR_NAME)
                };
                candidate.is_dir().then_some(candidate)
            }
        };
    }

    /// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM` to its
    /// device and inode).
    fn stderr_is_journal(&self) -> bool {
        let Some(stream) = self.env.get("JOURNAL_STREAM") else { return false };
        let Ok(stat) = nix::sys::stat::fstat(io::stderr()) else { return false };
        stream == &format!("{}:{}", stat.st_dev, stat.st_ino)
    }
}

impl Config {
    /// Checks rules that span several keys; returns the key and the problem.
    fn validate(&self) -> Result<(), (String, String)> {
        let identity = &self.identity;
        let issuer_files = [&identity.issuer_certificate, &identity.issuer_key, &identity.trust_anchors];
        let given = issuer_files.iter().filter(|f| f.is_some()).count();
        if given != 0 && given != 3 {
            return Err((
                "identity.issuer_certificate".into(),
                "issuer_certificate, issuer_key and trust_anchors go together".into(),
            ));
        }
        for (key, list) in [
            ("redirect.outbound_cidrs", &self.redirect.outbound_cidrs),
            ("redirect.exclude_cidrs", &self.redirect.exclude_cidrs),
        ] {
            for cidr in list {
                crate::redirect::check_cidr(cidr).map_err(|e| (key.to_owned(), e.to_string()))?;
            }
        }
        let mut uids = std::collections::BTreeSet::new();
        for (name, workload) in &identity.workloads {
            if !uids.insert(workload.uid) {
                return Err((
                    format!("identity.workloads.{name}.uid"),
                    format!("uid {} is mapped twice", workload.uid),
                ));
            }
        }
        Ok(())
    }

    /// The identity socket path.
    pub fn identity_socket(&self) -> PathBuf {
        self.identity.socket.clone().unwrap_or_else(|| self.store.state_dir().join("identity.sock"))
    }

    /// The effective configuration as TOML (what `meshkeep config show` prints).
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Reads one file, checks its syntax and that every key is known and well typed.
fn read_file(path: &Path) -> Result<toml::Table, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
    parse_file(path, &text)
}

/// Checks the text of one file (named `path` in errors): its syntax, and that every key is known
/// and well typed. Errors carry the file, line, column and key.
pub(crate) fn parse_file(path: &Path, text: &str) -> Result<toml::Table, Error> {
    let file_error = |span: Option<std::ops::Range<usize>>, key: Option<String>, message: String| {
        let (line, column) = span.map_or((0, 0), |s| position(text, s.start));
        Error::File { path: path.to_owned(), line, column, key, message }
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| file_error(e.span(), None, e.message().to_owned()))?;
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| file_error(e.span(), None, e.message().to_owned()))?;
    serde_path_to_error::deserialize::<_, Config>(deserializer).map_err(|e| {
        let key = key_of(e.path());
        file_error(e.inner().span(), key, e.inner().message().to_owned())
    })?;
    Ok(table)
}

/// The files in a drop-in directory ending in `.toml`, in lexical order.
fn drop_ins(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::DropInDir { path: dir.to_owned(), source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::DropInDir { path: dir.to_owned(), source })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Deserialises a merged table, returning the failing key path and message. The table goes
/// through its TOML text so that one deserialiser serves files and merged tables alike: each
/// instantiation of the configuration's deserialisation adds about 0.2 MB of code.
fn typed(table: &toml::Table) -> Result<Config, (Option<String>, String)> {
    let text = toml::to_string(table).map_err(|e| (None, e.to_string()))?;
    let deserializer = toml::Deserializer::parse(&text).map_err(|e| (None, e.message().to_owned()))?;
    serde_path_to_error::deserialize::<_, Config>(deserializer).map_err(|e| {
        let message = e.inner().message().to_owned();
        (key_of(e.path()), message)
    })
}

/// The dotted key an error is about (serde_path_to_error includes an unknown key itself).
fn key_of(path: &serde_path_to_error::Path) -> Option<String> {
    let key = path.to_string();
    (key != ".").then_some(key)
}

/// Merges `over` into `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(over_table)) => merge(base_table, over_table),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets a dotted key in a table, creating intermediate tables.
fn set_key(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().unwrap_or(dotted);
    let mut current = table;
    for part in parts {
        let entry = current.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else { unreachable!("replaced by a table just above") };
        current = next;
    }
    current.insert(last.to_owned(), value);
}

/// The 1-based line and column of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_with(files: &[(&str, &str)], env: &[(&str, &str)]) -> (tempfile::TempDir, Source) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        let source = Source::new(Some(dir.path().join("config.toml")), env, dir.path().to_owned());
        (dir, source)
    }

    fn load_err(files: &[(&str, &str)], env: &[(&str, &str)]) -> String {
        let (_dir, source) = source_with(files, env);
        source.load().expect_err("config should be refused").to_string()
    }

    #[test]
    fn the_watchdog_is_ours_only_for_our_pid() {
        let ours = std::process::id().to_string();
        let watchdog = |env: &[(&str, &str)]| {
            let (_dir, source) = source_with(&[("config.toml", "")], env);
            source.load().expect("load").service_manager.watchdog
        };
        assert_eq!(watchdog(&[("WATCHDOG_USEC", "30000000")]), Some(std::time::Duration::from_secs(30)));
        assert_eq!(
            watchdog(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", &ours)]),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            watchdog(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "1")]),
            None,
            "another process's watchdog"
        );
        assert_eq!(watchdog(&[]), None);
    }

    #[test]
    fn credentials_resolve_to_the_credentials_directory() {
        let link =
            "[upstream.links.east]\nserver = \"https://10.0.0.1:6443\"\ntoken_file = \"credential:east-token\"\n";
        let (_dir, source) =
            source_with(&[("config.toml", link)], &[("CREDENTIALS_DIRECTORY", "/run/credentials/meshkeep.service")]);
        let loaded = source.load().expect("load");
        let LinkAccess::Server { token_file, .. } = &loaded.config.upstream.links.values().next().unwrap().access
        else {
            panic!("a server link");
        };
        assert_eq!(token_file.as_deref(), Some(Path::new("/run/credentials/meshkeep.service/east-token")));
        assert!(loaded.missing_credentials.is_empty());
        // Outside systemd (an operator's command) the credential stays unresolved and is named.
        let (_dir, source) = source_with(&[("config.toml", link)], &[]);
        let loaded = source.load().expect("operator commands load it");
        let missing = loaded.missing_credentials.join("\n");
        assert!(
            missing.contains("upstream.links.east.token_file") && missing.contains("CREDENTIALS_DIRECTORY"),
            "{missing}"
        );
        let bad = link.replace("credential:east-token", "credential:../etc/shadow");
        assert!(
            load_err(&[("config.toml", &bad)], &[("CREDENTIALS_DIRECTORY", "/run/c")])
                .contains("not a credential name")
        );
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let (dir, source) = source_with(&[("config.toml", "")], &[]);
        let loaded = source.load().expect("load");
        assert_eq!(loaded.config.admin.listen, "127.0.0.1:4191".parse().unwrap());
        assert_eq!(loaded.config.runtime.workers, Workers::Auto);
        assert_eq!(loaded.config.runtime.drain_timeout, Duration::from_secs(10));
        assert_eq!(loaded.config.store.state_dir(), dir.path().join(DEFAULT_STATE_DIR));
        assert!(!loaded.embedded);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = load_err(&[("config.toml", "[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")], &[]);
        assert!(err.contains("config.toml:3:1:"), "{err}");
        assert!(err.contains("key `admin.lisen`"), "{err}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = load_err(&[("config.toml", "[nonsense]\na = 1\n")], &[]);
        assert!(err.contains("config.toml:1:"), "{err}");
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn bad_value_names_its_line_and_key() {
        let err = load_err(&[("config.toml", "[runtime]\n\nworkers = 0\n")], &[]);
        assert!(err.contains("config.toml:3:"), "{err}");
        assert!(err.contains("key `runtime.workers`"), "{err}");
        let err = load_err(&[("config.toml", "[runtime]\ndrain_timeout = \"10 parsecs\"\n")], &[]);
        assert!(err.contains("config.toml:2:"), "{err}");
        assert!(err.contains("runtime.drain_timeout"), "{err}");
        let err = load_err(&[("config.toml", "[admin]\nlisten = \"localhost\"\n")], &[]);
        assert!(err.contains("config.toml:2:") && err.contains("admin.listen"), "{err}");
    }

    #[test]
    fn syntax_error_names_its_line() {
        let err = load_err(&[("config.toml", "[admin]\nlisten = \n")], &[]);
        assert!(err.contains("config.toml:2:"), "{err}");
    }

    #[test]
    fn drop_ins_override_in_lexical_order_and_are_checked() {
        let (_dir, source) = source_with(
            &[
                ("config.toml", "[admin]\nlisten = \"127.0.0.1:1000\"\n[node]\nzone = \"a\"\n"),
                ("config.d/20-late.toml", "[admin]\nlisten = \"127.0.0.1:3000\"\n"),
                ("config.d/10-early.toml", "[admin]\nlisten = \"127.0.0.1:2000\"\n"),
                ("config.d/README", "not toml, ignored"),
            ],
            &[],
        );
        let loaded = source.load().expect("load");
        assert_eq!(loaded.config.admin.listen.port(), 3000);
        assert_eq!(loaded.config.node.zone.as_ref().map(Name::as_str), Some("a"));
        assert_eq!(loaded.files.len(), 3);

        let err = load_err(&[("config.toml", ""), ("config.d/50-bad.toml", "[log]\nfilter = 3\n")], &[]);
        assert!(err.contains("50-bad.toml:2:") && err.contains("log.filter"), "{err}");
    }

    #[test]
    fn environment_overrides_files_and_bad_values_name_the_variable() {
        let (_dir, source) = source_with(
            &[("config.toml", "[runtime]\nworkers = 2\n")],
            &[("MESHKEEP_WORKERS", "3"), ("STATE_DIRECTORY", "/var/lib/a:/var/lib/b"), ("MESHKEEP_NODE_ZONE", "z1")],
        );
        let loaded = source.load().expect("load");
        assert_eq!(loaded.config.runtime.workers.count(), 3);
        assert_eq!(loaded.config.store.state_dir(), Path::new("/var/lib/a"));
        assert_eq!(loaded.config.node.zone.map(|z| z.to_string()).as_deref(), Some("z1"));

        let err = load_err(&[("config.toml", "")], &[("MESHKEEP_ADMIN_LISTEN", "nope")]);
        assert!(err.contains("MESHKEEP_ADMIN_LISTEN") && err.contains("admin.listen"), "{err}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = load_err(&[], &[]);
        assert!(err.contains("config.toml: cannot read"), "{err}");
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let (_dir, source) = source_with(
            &[(
                "config.toml",
                "[runtime]\nworkers = 3\ndrain_timeout = \"1500ms\"\n[log]\nfilter = \"meshkeep=debug\"\n",
            )],
            &[],
        );
        let config = source.load().expect("load").config;
        let again: Config = toml::from_str(&config.to_toml()).expect("reparse");
        assert_eq!(config, again);
    }

    #[test]
    fn durations_parse_and_print() {
        for (text, millis) in
            [("250ms", 250), ("10s", 10_000), ("5m", 300_000), ("36h", 129_600_000), ("7d", 604_800_000)]
        {
            let d: Duration = text.parse().expect(text);
            assert_eq!(d.get().as_millis(), millis);
            assert_eq!(d.to_string(), text);
        }
        for bad in ["", "10", "s", "-1s", "1.5s", "10 s", "99999999999999999999d"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        for (text, bytes, printed) in [
            ("65536", 65_536, "64 KiB"),
            ("100", 100, "100 B"),
            ("100B", 100, "100 B"),
            ("512KiB", 524_288, "512 KiB"),
            ("1 MiB", 1_048_576, "1 MiB"),
            ("64MiB", 67_108_864, "64 MiB"),
            ("1536 KiB", 1_572_864, "1536 KiB"),
            ("2GiB", 2_147_483_648, "2 GiB"),
        ] {
            let size: ByteSize = text.parse().expect(text);
            assert_eq!(size.get(), bytes, "{text}");
            assert_eq!(size.to_string(), printed, "{text}");
            assert_eq!(printed.parse::<ByteSize>(), Ok(size), "{printed} reads back");
        }
        for bad in ["", "MiB", "-1", "1.5MiB", "64MB", "64 mib", "64  MiB", " 64MiB", "99999999999GiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_link_limits_its_responses_to_64_mib_unless_told() {
        let link = "[upstream.links.east]\nserver = \"https://10.0.0.1:6443\"\n";
        let limit = |extra: &str| {
            let (_dir, source) = source_with(&[("config.toml", &format!("{link}{extra}"))], &[]);
            let config = source.load().expect("load").config;
            let east = config.upstream.links.values().next().expect("a link").clone();
            let again: Config = toml::from_str(&config.to_toml()).expect("reparse");
            assert_eq!(again, config, "round trip");
            east.max_response_size
        };
        assert_eq!(limit(""), ByteSize::from_mib(64));
        assert_eq!(limit("max_response_size = \"1 MiB\"\n"), ByteSize::from_mib(1));
        assert_eq!(limit("max_response_size = 131072\n"), ByteSize::from_kib(128));
        let err = load_err(&[("config.toml", &format!("{link}max_response_size = \"1 KiB\"\n"))], &[]);
        assert!(err.contains("max_response_size must be at least 64 KiB"), "{err}");
        let err = load_err(&[("config.toml", &format!("{link}max_response_size = \"lots\"\n"))], &[]);
        assert!(err.contains("upstream.links.east") && err.contains("expected a size"), "{err}");
    }

    #[test]
    fn position_counts_lines_and_columns_from_one() {
        assert_eq!(position("ab\ncd", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
    }
}
