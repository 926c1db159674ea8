//! A Kubernetes link: watches one upstream cluster with kube-rs and reports to the store.
//!
//! Each kind (and each namespace, when the link is limited to some) has its own watcher with
//! kube-rs semantics: paginated list, watch from the list's resourceVersion, bookmarks,
//! relist on 410 Gone. Errors are backed off here (see [`Retry`]). A relist is buffered from
//! `Init` to `InitDone` and handed to the store as one replacement. What a response may bring into memory
//! is bounded by the link's `max_response_size` (see `limit.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::client::ClientBuilder;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::convert::{self, Invalid};
use super::limit::ResponseLimitLayer;
use super::wire;
use crate::config::{ByteSize, LinkAccess, LinkConfig};
use crate::drain;
use crate::model::{Kind, Object, ObjectRef, SourceId};
use crate::store::{Update, Updates};

/// While a list is in progress, the API server must answer within this long.
const LIST_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A watch with no event (not even a bookmark) for this long is restarted. kube-rs asks the
/// server for 290 s watches and allows itself 5 s more.
const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(330);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a client for a link: from a kubeconfig, or from a server URL with a token file and CA.
/// No response body larger than `max_response_size` is read (watch streams: no event line).
pub async fn client(access: &LinkAccess, max_response_size: ByteSize) -> Result<Client, String> {
    let config = match access {
        LinkAccess::Kubeconfig { path, context } => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            let options = kube::config::KubeConfigOptions { context: context.clone(), ..Default::default() };
            let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            config.connect_timeout = Some(CONNECT_TIMEOUT);
            config
        }
        LinkAccess::Server { url, token_file, ca_file } => {
            let uri: http::Uri = url.parse().map_err(|e| format!("server {url:?}: {e}"))?;
            let mut config = kube::Config::new(uri);
            config.connect_timeout = Some(CONNECT_TIMEOUT);
            if let Some(ca) = ca_file {
                check_readable(ca)?;
                config.root_cert_file = Some(ca.clone());
            }
            if let Some(token) = token_file {
                check_readable(token)?;
                config.auth_info.token_file = Some(token.display().to_string());
            }
            config
        }
    };
    let builder = ClientBuilder::try_from(config).map_err(|e| format!("cannot build a client: {e}"))?;
    Ok(builder.with_layer(&ResponseLimitLayer::new(max_response_size)).build())
}

fn check_readable(path: &Path) -> Result<(), String> {
    std::fs::metadata(path).map(|_| ()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs a link until the drain starts. It never gives up: a cluster that cannot be reached is
/// retried with backoff while the store keeps serving its last data.
pub async fn run(name: String, config: LinkConfig, updates: Updates, drain: drain::Watch) {
    let source = SourceId::Link(name);
    let mut backoff = Duration::from_secs(1);
    let client = loop {
        match client(&config.access, config.max_response_size).await {
            Ok(client) => break client,
            Err(message) => {
                if updates.send(Update::Failed { source: source.clone(), message }).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = drain.signaled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    };
    let watches = watches(&client, &config, &source, &updates);
    tracing::info!(%source, watches = watches.len(), "link started");
    tokio::select! {
        _ = futures::future::join_all(watches) => {}
        _ = drain.signaled() => {}
    }
}

type Watch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One watch per kind, or per kind and namespace when the link is limited to namespaces.
fn watches(client: &Client, config: &LinkConfig, source: &SourceId, updates: &Updates) -> Vec<Watch> {
    let scopes: Vec<Option<String>> =
        if config.namespaces.is_empty() { vec![None] } else { config.namespaces.iter().cloned().map(Some).collect() };
    let progress = Arc::new(Mutex::new(BTreeMap::new()));
    let base = Ctx {
        source: source.clone(),
        kind: Kind::Service,
        namespace: None,
        scopes: scopes.len(),
        updates: updates.clone(),
        progress,
    };
    let wc = watcher::Config::default().page_size(config.page_size);
    let mut watches: Vec<Watch> = Vec::new();
    for scope in &scopes {
        let ctx = |kind| Ctx { kind, namespace: scope.clone(), ..base.clone() };
        let api = |_: Kind| scope.as_deref();
        watches.push(Box::pin(watch::<core::Service>(
            api_for(client, api(Kind::Service)),
            wc.clone(),
            ctx(Kind::Service),
            |s| convert::service(s).map(|s| Some(Object::Service(s))),
        )));
        watches.push(Box::pin(watch::<discovery::EndpointSlice>(
            api_for(client, api(Kind::EndpointSlice)),
            wc.clone(),
            ctx(Kind::EndpointSlice),
            |s| convert::endpoint_slice(s).map(|s| s.map(Object::EndpointSlice)),
        )));
        watches.push(Box::pin(watch::<wire::Pod>(api_for(client, api(Kind::Pod)), wc.clone(), ctx(Kind::Pod), |p| {
            convert::pod(p).map(|p| Some(Object::Pod(p)))
        })));
        watches.push(Box::pin(watch::<wire::TrafficSplit>(
            api_for(client, api(Kind::TrafficSplit)),
            wc.clone(),
            ctx(Kind::TrafficSplit),
            |s| convert::traffic_split(s).map(|s| Some(Object::TrafficSplit(s))),
        )));
        watches.push(Box::pin(watch::<wire::TrafficTarget>(
            api_for(client, api(Kind::TrafficTarget)),
            wc.clone(),
            ctx(Kind::TrafficTarget),
            |t| convert::traffic_target(t).map(|t| Some(Object::TrafficTarget(t))),
        )));
        watches.push(Box::pin(watch::<wire::HttpRouteGroup>(
            api_for(client, api(Kind::HttpRouteGroup)),
            wc.clone(),
            ctx(Kind::HttpRouteGroup),
            |g| convert::http_route_group(g).map(|g| Some(Object::HttpRouteGroup(g))),
        )));
        watches.push(Box::pin(watch::<wire::TcpRoute>(
            api_for(client, api(Kind::TcpRoute)),
            wc.clone(),
            ctx(Kind::TcpRoute),
            |r| convert::tcp_route(r).map(|r| Some(Object::TcpRoute(r))),
        )));
        watches.push(Box::pin(watch::<wire::HttpRoute>(
            api_for(client, api(Kind::HttpRoute)),
            wc.clone(),
            ctx(Kind::HttpRoute),
            |r| convert::http_route(r).map(|r| Some(Object::HttpRoute(r))),
        )));
    }
    // The issuer and trust roots live in the control-plane namespace, whatever the selection.
    let identity_ctx =
        |kind| Ctx { kind, namespace: Some(config.control_plane_namespace.clone()), scopes: 1, ..base.clone() };
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    watches.push(Box::pin(watch::<core::Secret>(
        Api::namespaced(client.clone(), &config.control_plane_namespace),
        by_name(&config.issuer_secret),
        identity_ctx(Kind::IdentityIssuer),
        |s| convert::identity_issuer(s).map(|i| Some(Object::IdentityIssuer(i))),
    )));
    watches.push(Box::pin(watch::<core::ConfigMap>(
        Api::namespaced(client.clone(), &config.control_plane_namespace),
        by_name(&config.trust_roots_configmap),
        identity_ctx(Kind::TrustRoots),
        |c| convert::trust_roots(c).map(|t| Some(Object::TrustRoots(t))),
    )));
    watches
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What one watch reports on, and the shared record of which namespaces have been listed.
#[derive(Clone)]
struct Ctx {
    source: SourceId,
    kind: Kind,
    namespace: Option<String>,
    /// How many scopes (namespaces) this kind is watched in.
    scopes: usize,
    updates: Updates,
    progress: Arc<Mutex<BTreeMap<Kind, BTreeSet<Option<String>>>>>,
}

impl Ctx {
    /// Records that this scope has been listed; true once every scope of the kind has.
    fn listed(&self) -> bool {
        // A poisoned lock only means another watch panicked mid-insert; the set is still valid.
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let listed = progress.entry(self.kind).or_default();
        listed.insert(self.namespace.clone());
        listed.len() >= self.scopes
    }

    async fn send(&self, update: Update) -> bool {
        self.updates.send(update).await.is_ok()
    }

    /// After a good event: if the watch had `failing`, reports contact again and clears it.
    async fn recovered(&self, failing: &mut bool) -> bool {
        if std::mem::take(failing) { self.send(Update::Contact { source: self.source.clone() }).await } else { true }
    }
}

/// Follows one watcher, converting its events into store updates. Returns when the store stops.
async fn watch<K>(api: Api<K>, wc: watcher::Config, ctx: Ctx, convert: fn(&K) -> Result<Option<Object>, Invalid>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    <K as Resource>::DynamicType: Default,
{
    let mut reported_absent = false;
    // Set when this watch reported a failure; its next good event reports contact again (a
    // watch stream carries on after a bad event, so no relist may come to say so).
    let mut failing = false;
    let mut retry = Retry::new();
    'restart: loop {
        let mut stream = watcher(api.clone(), wc.clone()).boxed();
        let mut buffer: Option<Vec<Object>> = None;
        loop {
            let idle = if buffer.is_some() { LIST_IDLE_TIMEOUT } else { WATCH_IDLE_TIMEOUT };
            let event = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(event)) => event,
                Ok(None) => continue 'restart,
                Err(_) => {
                    let message =
                        format!("{} {}: no answer for {}s; restarting the watch", ctx.source, ctx.kind, idle.as_secs());
                    if !ctx.send(Update::Failed { source: ctx.source.clone(), message }).await {
                        return;
                    }
                    failing = true;
                    continue 'restart;
                }
            };
            let mut pause = None;
            let alive = match event {
                Ok(Event::Init) => {
                    buffer = Some(Vec::new());
                    true
                }
                Ok(Event::InitApply(object)) => {
                    if let Some(converted) = convert_or_warn(&ctx, &object, convert).await {
                        buffer.get_or_insert_with(Vec::new).push(converted);
                    }
                    true
                }
                Ok(Event::InitDone) => {
                    let objects = buffer.take().unwrap_or_default();
                    let complete = ctx.listed();
                    reported_absent = false;
                    failing = false;
                    ctx.send(Update::Replace {
                        source: ctx.source.clone(),
                        kind: ctx.kind,
                        namespace: ctx.namespace.clone(),
                        objects,
                        resource_version: None,
                        complete,
                    })
                    .await
                        && ctx.send(Update::Contact { source: ctx.source.clone() }).await
                }
                Ok(Event::Apply(object)) => {
                    let resource_version = object.meta().resource_version.clone();
                    let applied = match convert_or_warn(&ctx, &object, convert).await {
                        Some(converted) => {
                            ctx.send(Update::Apply { source: ctx.source.clone(), object: converted, resource_version })
                                .await
                        }
                        None => true,
                    };
                    applied && ctx.recovered(&mut failing).await
                }
                Ok(Event::Delete(object)) => {
                    let meta = object.meta();
                    let key = ObjectRef::new(
                        meta.namespace.clone().unwrap_or_default(),
                        meta.name.clone().unwrap_or_default(),
                    );
                    ctx.send(Update::Delete {
                        source: ctx.source.clone(),
                        kind: ctx.kind,
                        key,
                        resource_version: meta.resource_version.clone(),
                    })
                    .await
                        && ctx.recovered(&mut failing).await
                }
                Err(error) => {
                    buffer = None;
                    // The watcher tries again as soon as it is polled: not before the delay.
                    pause = Some(retry.delay());
                    if is_not_served(&error) {
                        if reported_absent {
                            true
                        } else {
                            reported_absent = true;
                            tracing::info!(source = %ctx.source, kind = %ctx.kind, "not served by the API server (CRD not installed?); treated as empty");
                            // Not served at all means no such objects in any namespace.
                            ctx.listed();
                            ctx.send(Update::Absent { source: ctx.source.clone(), kind: ctx.kind }).await
                        }
                    } else {
                        let message = format!("{} {}: {error}", ctx.source, ctx.kind);
                        tracing::debug!(%message, "watch error");
                        failing = true;
                        ctx.send(Update::Failed { source: ctx.source.clone(), message }).await
                    }
                }
            };
            if !alive {
                return;
            }
            if let Some(delay) = pause {
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The wait before a watch tries again after an error: from 0.8 s, doubling up to 30 s, and
/// from the start again once two minutes pass without an error (client-go's reflector numbers),
/// each wait drawn between half and all of it so that watches (and boxes) cut off together do
/// not come back in step. kube-runtime's own backoff would not do: it starts over on every
/// item, and its watcher yields `Init` before each list attempt, so against an unreachable
/// cluster it kept retrying about once a second for as long as the partition lasted.
#[derive(Debug)]
struct Retry {
    next: Duration,
    last_error: Option<tokio::time::Instant>,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(800);
    const LONGEST: Duration = Duration::from_secs(30);
    /// Errors further apart than this are separate incidents.
    const FORGET: Duration = Duration::from_secs(120);

    fn new() -> Self {
        Self { next: Self::FIRST, last_error: None }
    }

    /// The wait after an error that happens now.
    fn delay(&mut self) -> Duration {
        let now = tokio::time::Instant::now();
        if self.last_error.is_some_and(|last| now.duration_since(last) > Self::FORGET) {
            self.next = Self::FIRST;
        }
        self.last_error = Some(now);
        let full = self.next;
        self.next = (full * 2).min(Self::LONGEST);
        let half = full / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(crate::proxy::balance::roll() % spread.saturating_add(1))
    }
}

async fn convert_or_warn<K: Resource>(
    ctx: &Ctx,
    object: &K,
    convert: fn(&K) -> Result<Option<Object>, Invalid>,
) -> Option<Object> {
    match convert(object) {
        Ok(converted) => converted,
        Err(invalid) => {
            tracing::warn!(source = %ctx.source, error = %invalid, "object skipped");
            ctx.send(Update::Warning { source: ctx.source.clone(), message: invalid.to_string() }).await;
            None
        }
    }
}

/// A 404 on list means the resource type is not served (its CRD is not installed).
fn is_not_served(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_waits_grow_to_the_longest_and_start_over_after_a_quiet_spell() {
        let mut retry = Retry::new();
        let mut full = Retry::FIRST;
        for _ in 0..8 {
            let wait = retry.delay();
            assert!(wait >= full / 2 && wait <= full, "{wait:?} outside {:?}..={full:?}", full / 2);
            tokio::time::advance(wait).await;
            full = (full * 2).min(Retry::LONGEST);
        }
        assert_eq!(full, Retry::LONGEST);
        // An error 60 s after the last wait ended (75-90 s after that error): still long waits.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(retry.delay() >= Retry::LONGEST / 2);
        // Two minutes without one: a new incident starts from the first wait.
        tokio::time::advance(Retry::FORGET + Duration::from_secs(1)).await;
        assert!(retry.delay() <= Retry::FIRST);
    }
}
