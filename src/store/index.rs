//! The lookups a source's objects answer per connection, per request and per DNS query, built
//! once per change of the source instead of scanning every object each time: which service a
//! cluster IP belongs to, which slice an endpoint address is in, a service's slices, and the
//! HTTPRoutes and TrafficSplits that route a service, the TrafficTargets that guard a service
//! account.
//!
//! Every list keeps the objects' key order, so an answer taken from the index is the one a scan
//! in key order would find first. The index covers every stored object, so it depends on the
//! objects alone: readers check first that a kind is known (`SourceView::objects`).

use hashbrown::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use super::snapshot::SourceView;
use crate::model::{Kind, Object, ObjectRef};

/// One source's lookups; see the module comment. The lookups that grow with the cluster are
/// sorted lists searched by bisection (names are inline up to 24 bytes, so most entries own no
/// allocation of their own); the policy ones, a few objects each, are maps.
#[derive(Debug, Default)]
pub struct SourceIndex {
    /// (cluster IP, service), sorted.
    services_by_ip: Vec<(IpAddr, ObjectRef)>,
    /// (service, slice), sorted.
    slices: Vec<(ObjectRef, ObjectRef)>,
    /// (endpoint IP, position in `slices`), sorted.
    slices_by_ip: Vec<(IpAddr, u32)>,
    routes_by_parent: HashMap<ObjectRef, Vec<ObjectRef>>,
    splits_by_service: HashMap<ObjectRef, Vec<ObjectRef>>,
    targets_by_account: HashMap<ObjectRef, Vec<ObjectRef>>,
}

static EMPTY: &[ObjectRef] = &[];

impl SourceIndex {
    /// The kinds whose objects the index is built from; a change to any other kind keeps it.
    pub(super) fn covers(kind: Kind) -> bool {
        matches!(kind, Kind::Service | Kind::EndpointSlice | Kind::HttpRoute | Kind::TrafficSplit | Kind::TrafficTarget)
    }

    fn build(view: &SourceView) -> Self {
        let mut index = Self::default();
        let all = |kind| view.kinds().get(&kind).into_iter().flat_map(|objects| objects.iter());
        for (key, object) in all(Kind::Service) {
            let Object::Service(service) = object else { continue };
            index.services_by_ip.extend(service.cluster_ips.iter().map(|ip| (*ip, key.clone())));
        }
        index.services_by_ip.sort_unstable();
        // A service that lists an IP twice is one answer.
        index.services_by_ip.dedup();
        index.services_by_ip.shrink_to_fit();

        for (key, object) in all(Kind::EndpointSlice) {
            let Object::EndpointSlice(slice) = object else { continue };
            index.slices.push((ObjectRef::new(&slice.meta.namespace, &slice.service), key.clone()));
        }
        index.slices.sort_unstable();
        index.slices.shrink_to_fit();
        let stored = view.kinds().get(&Kind::EndpointSlice);
        for (position, (_, key)) in (0u32..).zip(&index.slices) {
            let Some(Object::EndpointSlice(slice)) = stored.and_then(|objects| objects.get(key)) else { continue };
            index.slices_by_ip.extend(slice.endpoints.iter().flat_map(|e| &e.addresses).map(|ip| (*ip, position)));
        }
        // Of the slices with an address, the first in key order answers (as a scan would).
        let slices = &index.slices;
        let slice_key = |position: u32| &slices[position as usize].1;
        index.slices_by_ip.sort_unstable_by(|(a, p), (b, q)| a.cmp(b).then_with(|| slice_key(*p).cmp(slice_key(*q))));
        index.slices_by_ip.dedup_by_key(|(ip, _)| *ip);
        index.slices_by_ip.shrink_to_fit();

        for (key, object) in all(Kind::HttpRoute) {
            let Object::HttpRoute(route) = object else { continue };
            for parent in &route.parents {
                let list = index.routes_by_parent.entry(ObjectRef::new(&parent.namespace, &parent.name)).or_default();
                if list.last() != Some(key) {
                    list.push(key.clone());
                }
            }
        }
        for (key, object) in all(Kind::TrafficSplit) {
            let Object::TrafficSplit(split) = object else { continue };
            let service = ObjectRef::new(&split.meta.namespace, &split.service);
            index.splits_by_service.entry(service).or_default().push(key.clone());
        }
        for (key, object) in all(Kind::TrafficTarget) {
            let Object::TrafficTarget(target) = object else { continue };
            let account = ObjectRef::new(&target.destination.namespace, &target.destination.name);
            index.targets_by_account.entry(account).or_default().push(key.clone());
        }
        index
    }

    /// Services (keys, in key order) with `ip` among their cluster IPs.
    pub fn services_with_ip(&self, ip: IpAddr) -> impl Iterator<Item = &ObjectRef> {
        let start = self.services_by_ip.partition_point(|(i, _)| *i < ip);
        self.services_by_ip[start..].iter().take_while(move |(i, _)| *i == ip).map(|(_, key)| key)
    }

    /// The first slice (in key order) with an endpoint at `ip`.
    pub fn slice_with_ip(&self, ip: IpAddr) -> Option<&ObjectRef> {
        let found = self.slices_by_ip.binary_search_by_key(&ip, |(i, _)| *i).ok()?;
        let position = self.slices_by_ip[found].1 as usize;
        self.slices.get(position).map(|(_, key)| key)
    }

    /// The slices of a service (`kubernetes.io/service-name`), in key order.
    pub fn slices_of(&self, service: &ObjectRef) -> impl Iterator<Item = &ObjectRef> {
        let start = self.slices.partition_point(|(s, _)| s < service);
        self.slices[start..].iter().take_while(move |(s, _)| s == service).map(|(_, key)| key)
    }

    /// HTTPRoutes with a parent of this namespace and name (of any kind: the caller checks
    /// which parent it is), in key order.
    pub fn routes_with_parent(&self, parent: &ObjectRef) -> &[ObjectRef] {
        self.routes_by_parent.get(parent).map_or(EMPTY, Vec::as_slice)
    }

    /// TrafficTargets whose destination is this service account (namespace and name), in key
    /// order.
    pub fn targets_for(&self, account: &ObjectRef) -> &[ObjectRef] {
        self.targets_by_account.get(account).map_or(EMPTY, Vec::as_slice)
    }

    /// TrafficSplits whose root is this service, in key order.
    pub fn splits_of(&self, service: &ObjectRef) -> &[ObjectRef] {
        self.splits_by_service.get(service).map_or(EMPTY, Vec::as_slice)
    }
}

/// A source view's index, built by the first reader that asks and shared with the view's clones.
/// The store clones a view to change it, and most changes leave the index as it was (a source's
/// contact time, its sync state, kinds the index does not cover); a change to a kind it covers
/// drops it (`SourceView::kind_mut`), and the next reader builds it from what the view then holds.
#[derive(Debug, Default, Clone)]
pub(super) struct LazyIndex(OnceLock<Arc<SourceIndex>>);

impl LazyIndex {
    pub(super) fn get_or_build(&self, view: &SourceView) -> &SourceIndex {
        self.0.get_or_init(|| Arc::new(SourceIndex::build(view)))
    }

    #[cfg(test)]
    pub(super) fn is_built(&self) -> bool {
        self.0.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_to_an_indexed_kind_drops_the_index() {
        let mut view = SourceView::default();
        for kind in Kind::ALL {
            view.set_kind(kind, []);
        }
        view.index();
        for kind in Kind::ALL {
            view.set_kind(kind, []);
            assert_eq!(view.index_is_built(), !SourceIndex::covers(kind), "{kind:?}");
            view.index();
        }
    }

    #[test]
    fn a_clone_shares_the_index_until_it_changes_a_kind_the_index_covers() {
        let mut view = SourceView::default();
        view.set_kind(Kind::Service, []);
        let built: *const SourceIndex = view.index();
        let mut clone = view.clone();
        clone.meta.last_contact = Some(1);
        assert!(std::ptr::eq(clone.index(), built), "a change of metadata keeps the index");
        clone.set_kind(Kind::Service, []);
        assert!(!clone.index_is_built(), "a change to services drops the clone's index");
        assert!(std::ptr::eq(view.index(), built), "and leaves the original's");
    }
}
