//! Routing and authorization decided from the snapshot by pure functions: which backends an
//! HTTP request goes to (Gateway API HTTPRoute, SMI TrafficSplit) and whether a client may
//! reach a local workload (SMI TrafficTarget with HTTPRouteGroup and TCPRoute). The proxy calls
//! them per request or connection with the snapshot of the moment, so a policy change applies
//! to the next request without touching established connections.

pub mod authz;
pub mod routes;

use std::collections::HashMap;
use std::sync::Mutex;

use http::HeaderMap;

use crate::model::{HttpMatch, Kind, Object, ObjectRef};
use crate::store::{Snapshot, SourceIndex};

/// What routing and authorization look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The request's `:authority`, else its Host header.
    pub host: Option<&'a str>,
}

impl<'a> RequestInfo<'a> {
    pub fn of(parts: &'a http::request::Parts) -> Self {
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
        Self { method: parts.method.as_str(), path: parts.uri.path(), headers: &parts.headers, host }
    }
}

/// The objects of `kind` that an index lookup names, source by source (in source order, then key
/// order), from the sources where the kind is known.
fn indexed<'s>(
    snapshot: &'s Snapshot,
    kind: Kind,
    lookup: impl Fn(&'s SourceIndex) -> &'s [ObjectRef] + 's,
) -> impl Iterator<Item = &'s Object> + 's {
    snapshot.sources().flat_map(move |(_, view)| {
        let objects = view.objects(kind);
        let keys = if objects.is_some() { lookup(view.index()) } else { &[] };
        keys.iter().filter_map(move |key| objects?.get(key))
    })
}

/// The object of `kind` with this key in each source where the kind is known, in source order.
fn named<'s>(snapshot: &'s Snapshot, kind: Kind, key: &'s ObjectRef) -> impl Iterator<Item = &'s Object> + 's {
    snapshot.sources().filter_map(move |(_, view)| view.objects(kind)?.get(key))
}

/// Compiled regular expressions, by pattern; patterns come from policy objects, so they are
/// few and repeat. An invalid pattern never matches.
static REGEXES: Mutex<Option<HashMap<String, Option<regex_lite::Regex>>>> = Mutex::new(None);
/// Beyond this many patterns the cache starts over (policy churn must not grow memory).
const MAX_REGEXES: usize = 512;

/// Whether `value` matches `pattern` as a whole (anchored at both ends).
pub fn full_match(pattern: &str, value: &str) -> bool {
    let mut cache = REGEXES.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_REGEXES && !cache.contains_key(pattern) {
        cache.clear();
    }
    let regex = cache.entry(pattern.to_owned()).or_insert_with(|| {
        let anchored = format!("^(?:{pattern})$");
        regex_lite::Regex::new(&anchored)
            .inspect_err(|e| tracing::warn!(%pattern, error = %e, "policy: invalid regular expression never matches"))
            .ok()
    });
    regex.as_ref().is_some_and(|r| r.is_match(value))
}

/// Whether an SMI HTTPRouteGroup match accepts the request.
pub fn smi_match(m: &HttpMatch, request: &RequestInfo<'_>) -> bool {
    let method_ok =
        m.methods.is_empty() || m.methods.iter().any(|x| x == "*" || x.eq_ignore_ascii_case(request.method));
    let path_ok = m.path_regex.as_deref().is_none_or(|p| full_match(p, request.path));
    let headers_ok = m.headers.iter().all(|(name, pattern)| {
        let mut values = request.headers.get_all(name.as_str()).iter().peekable();
        if name == "host" && values.peek().is_none() {
            // An HTTP/2 client names the host in :authority alone.
            return request.host.is_some_and(|host| full_match(pattern, host));
        }
        values.any(|v| v.to_str().is_ok_and(|v| full_match(pattern, v)))
    });
    method_ok && path_ok && headers_ok
}

#[cfg(test)]
mod tests;
