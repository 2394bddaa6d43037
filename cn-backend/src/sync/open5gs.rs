//! The Open5GS subscriber document of a child credential (pure: no I/O).
//!
//! The shape is the one Open5GS reads and its WebUI writes, learnt from the upstream sources
//! (open5gs/open5gs): the WebUI's Mongoose model `webui/server/models/subscriber.js` and the C
//! reader `lib/dbi/subscription.c` (`ogs_dbi_auth_info`, `ogs_dbi_subscription_data`,
//! `ogs_dbi_increment_sqn`). Facts that matter here:
//!
//! - The document is found by `imsi`, the SUPI's digits.
//! - `security.k`, `opc`, `amf` are hex strings; `op` is null when `opc` is given.
//!   `security.sqn` is read **only if it is a BSON int64** (a double or int32 is skipped, and
//!   the AUSF then starts from SQN 0); the UDM advances it with `$inc` by 32 and masks it to
//!   48 bits.
//! - Every other number is read **only if it is a BSON int32** (`sst`, `type`, `qos.index`, the
//!   ARP fields, `ambr.*.value` and `unit`, `access_restriction_data`, `subscriber_status`,
//!   `network_access_mode`, `subscribed_rau_tau_timer`): an int64 there is silently ignored.
//!   [`document`] therefore builds every number with an explicit BSON type.
//! - `sd` is a hex string, `default_indicator` a boolean.
//! - A bitrate is `{value, unit}` with unit 0 bps, 1 Kbps, 2 Mbps, 3 Gbps, 4 Tbps.
//! - `subscriber_status` is not enforced on the 5G path, so a credential that must stop working
//!   has its document deleted ([`Desired::Absent`]), never marked.
//!
//! What a child credential says and where it goes:
//!
//! | credential | document |
//! |---|---|
//! | SUPI | `imsi` (digits) |
//! | K, OPc, AMF | `security.k`, `opc`, `amf` (upper-case hex), `op: null` |
//! | SQN_HE | `security.sqn` (int64), written on insert only: once the document exists the core's UDM owns it |
//! | allowed DNNs | one session per DNN in the one slice (`[sync.open5gs] default_dnns` when any DNN is allowed) |
//! | bitrate cap | UE AMBR and every session's AMBR, both directions (`ambr_*_kbps` defaults without a cap) |
//! | status, parent status, expiry | present or absent: active, parent active and not expired = upserted, otherwise deleted |
//!
//! Not mapped (Open5GS has no place for them): the roaming restriction (Open5GS keeps no
//! per-subscriber roaming flag; `operator_determined_barring` is read for EPC only), the expiry
//! time itself (enforced by deleting the document on time), the device binding and attestation
//! (the core never sees the device key), the parent link and the quota.

use mongodb::bson::{Bson, Document, doc};

use crate::config::Open5gsSettings;
use crate::model::{Amf, ChildCredential, ChildStatus, SubscriberKeys, SubscriptionStatus};
use crate::model::{Dnn, Timestamp};
use companion_crypto::aka::Sqn;

/// The WebUI's current `schema_version`.
pub const SCHEMA_VERSION: i32 = 1;

/// What the core's store should hold for one credential.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    /// The subscriber document: `set` replaces these top-level fields on every push;
    /// `set_on_insert` (the `security` sub-document, SQN included) only when the document is new,
    /// so a renewal never rewinds the SQN the core advanced.
    Present {
        /// Fields written on every push.
        set: Document,
        /// Fields written when the document is created.
        set_on_insert: Document,
    },
    /// No document: revoked, expired, or the parent is not active.
    Absent,
}

impl Desired {
    /// Whether a document should exist.
    pub fn is_present(&self) -> bool {
        matches!(self, Self::Present { .. })
    }
}

/// The document's fields for credential `child` with `keys`, `amf` and its SQN_HE `sqn`, or
/// [`Desired::Absent`] when the credential must not work (revoked, expired at `now`, or its
/// parent `parent_status` is not active).
pub fn desired(
    child: &ChildCredential,
    parent_status: SubscriptionStatus,
    keys: &SubscriberKeys,
    amf: Amf,
    sqn: Sqn,
    profile: &Open5gsSettings,
    now: Timestamp,
) -> Desired {
    let usable = child.status == ChildStatus::Active
        && parent_status == SubscriptionStatus::Active
        && child.expires_at > now;
    if !usable {
        return Desired::Absent;
    }
    let full = document(child, keys, amf, sqn, profile);
    let mut set = Document::new();
    let mut set_on_insert = Document::new();
    for (k, v) in full {
        if k == "security" {
            set_on_insert.insert(k, v);
        } else {
            set.insert(k, v);
        }
    }
    Desired::Present { set, set_on_insert }
}

/// A bitrate as Open5GS stores it: in bit/s (unit 0) when the value fits an int32, otherwise
/// in the smallest unit it fits, rounded down (dividing by 1000). Unit 0 is preferred because
/// it does not depend on the reader's factor between units (the `subscription.c` read for this
/// multiplies by 1024 per step; the WebUI's labels suggest 1000).
pub fn bitrate(kbps: u32) -> Document {
    let mut value = u64::from(kbps) * 1000;
    let mut unit = 0i32;
    while unit < 4 && i32::try_from(value).is_err() {
        value /= 1000;
        unit += 1;
    }
    let value = i32::try_from(value).unwrap_or(i32::MAX);
    doc! { "value": Bson::Int32(value), "unit": Bson::Int32(unit) }
}

fn ambr(downlink_kbps: u32, uplink_kbps: u32) -> Document {
    doc! { "downlink": bitrate(downlink_kbps), "uplink": bitrate(uplink_kbps) }
}

fn int32(v: impl Into<i64>) -> Bson {
    Bson::Int32(i32::try_from(v.into()).unwrap_or(i32::MAX))
}

/// The whole subscriber document (as it is first inserted) of an active credential.
pub fn document(
    child: &ChildCredential,
    keys: &SubscriberKeys,
    amf: Amf,
    sqn: Sqn,
    profile: &Open5gsSettings,
) -> Document {
    let (down, up) = match child.restrictions.max_bitrate_kbps {
        Some(cap) => (cap, cap),
        None => (profile.ambr_downlink_kbps, profile.ambr_uplink_kbps),
    };
    let dnns: Vec<String> = if child.restrictions.allowed_dnns.is_empty() {
        profile.default_dnns.clone()
    } else {
        child
            .restrictions
            .allowed_dnns
            .iter()
            .map(Dnn::as_str)
            .map(str::to_owned)
            .collect()
    };
    let sessions: Vec<Bson> = dnns
        .into_iter()
        .map(|name| {
            Bson::Document(doc! {
                "name": name,
                "type": int32(profile.session_type),
                "qos": {
                    "index": int32(profile.qos_index),
                    "arp": {
                        "priority_level": int32(profile.arp_priority_level),
                        "pre_emption_capability": int32(profile.arp_pre_emption_capability),
                        "pre_emption_vulnerability": int32(profile.arp_pre_emption_vulnerability),
                    },
                },
                "ambr": ambr(down, up),
                "pcc_rule": Bson::Array(Vec::new()),
            })
        })
        .collect();
    let mut slice = doc! { "sst": int32(profile.sst) };
    if !profile.sd.is_empty() {
        slice.insert("sd", profile.sd.to_ascii_lowercase());
    }
    slice.insert("default_indicator", true);
    slice.insert("session", sessions);
    // The SQN is at most 48 bits: always a non-negative int64.
    let sqn = i64::try_from(sqn.value()).unwrap_or(i64::MAX);
    doc! {
        "schema_version": Bson::Int32(SCHEMA_VERSION),
        "imsi": child.supi.imsi(),
        "msisdn": Bson::Array(Vec::new()),
        "imeisv": Bson::Array(Vec::new()),
        "mme_host": Bson::Array(Vec::new()),
        "mme_realm": Bson::Array(Vec::new()),
        "purge_flag": Bson::Array(Vec::new()),
        "security": {
            "k": hex::encode_upper(keys.k.expose()),
            "op": Bson::Null,
            "opc": hex::encode_upper(keys.opc.expose()),
            "amf": hex::encode_upper(amf.0),
            "sqn": Bson::Int64(sqn),
        },
        "ambr": ambr(down, up),
        "slice": [Bson::Document(slice)],
        "access_restriction_data": int32(profile.access_restriction_data),
        "subscriber_status": Bson::Int32(0),
        "operator_determined_barring": Bson::Int32(0),
        "network_access_mode": int32(profile.network_access_mode),
        "subscribed_rau_tau_timer": int32(profile.subscribed_rau_tau_timer),
        "__v": Bson::Int32(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceId, KeyFingerprint, RequestId, Restrictions, Supi};
    use companion_crypto::secret::Key128;

    fn child(dnns: &[&str], cap: Option<u32>) -> ChildCredential {
        ChildCredential {
            supi: Supi::parse("imsi-001010900000001").unwrap(),
            parent: Supi::parse("imsi-001010000000001").unwrap(),
            device_id: DeviceId::parse("watch-1").unwrap(),
            device_key_fingerprint: KeyFingerprint([7; 32]),
            device_spki: None,
            request_id: RequestId([1; 16]),
            amf: Amf::DEFAULT,
            sqn: Sqn::ZERO,
            issued_at: Timestamp(1000),
            expires_at: Timestamp(2000),
            renewed_at: None,
            restrictions: Restrictions {
                roaming_allowed: false,
                allowed_dnns: dnns.iter().map(|d| Dnn::parse(d).unwrap()).collect(),
                max_bitrate_kbps: cap,
            },
            status: ChildStatus::Active,
            revoked_at: None,
        }
    }

    fn keys() -> SubscriberKeys {
        SubscriberKeys {
            k: Key128::from_hex("465b5ce8b199b49faa5f0a2ee238a6bc").unwrap(),
            opc: Key128::from_hex("cd63cb71954a9f4e48a5994e37a02baf").unwrap(),
        }
    }

    fn profile() -> Open5gsSettings {
        Open5gsSettings::with_uri("mongodb://127.0.0.1:27017")
    }

    #[test]
    fn document_has_open5gs_shape_and_types() {
        let d = document(
            &child(&["iot", "internet"], Some(2_000)),
            &keys(),
            Amf::DEFAULT,
            Sqn::new(5).unwrap(),
            &profile(),
        );
        assert_eq!(d.get_str("imsi").unwrap(), "001010900000001");
        assert_eq!(d.get("schema_version"), Some(&Bson::Int32(1)));
        let sec = d.get_document("security").unwrap();
        assert_eq!(
            sec.get_str("k").unwrap(),
            "465B5CE8B199B49FAA5F0A2EE238A6BC"
        );
        assert_eq!(
            sec.get_str("opc").unwrap(),
            "CD63CB71954A9F4E48A5994E37A02BAF"
        );
        assert_eq!(sec.get_str("amf").unwrap(), "8000");
        assert_eq!(sec.get("op"), Some(&Bson::Null));
        // Small SQNs too are int64: Open5GS reads sqn only when it holds an int64.
        assert_eq!(sec.get("sqn"), Some(&Bson::Int64(5)));
        let slices = d.get_array("slice").unwrap();
        assert_eq!(slices.len(), 1);
        let slice = slices[0].as_document().unwrap();
        assert_eq!(slice.get("sst"), Some(&Bson::Int32(1)));
        assert!(slice.get("sd").is_none());
        assert_eq!(slice.get("default_indicator"), Some(&Bson::Boolean(true)));
        let sessions = slice.get_array("session").unwrap();
        let names: Vec<&str> = sessions
            .iter()
            .map(|s| s.as_document().unwrap().get_str("name").unwrap())
            .collect();
        assert_eq!(names, ["iot", "internet"]);
        let s0 = sessions[0].as_document().unwrap();
        assert_eq!(s0.get("type"), Some(&Bson::Int32(3)));
        let qos = s0.get_document("qos").unwrap();
        assert_eq!(qos.get("index"), Some(&Bson::Int32(9)));
        let arp = qos.get_document("arp").unwrap();
        assert_eq!(arp.get("priority_level"), Some(&Bson::Int32(8)));
        assert_eq!(arp.get("pre_emption_capability"), Some(&Bson::Int32(1)));
        assert_eq!(arp.get("pre_emption_vulnerability"), Some(&Bson::Int32(1)));
        // 2000 kbit/s = 2_000_000 bit/s fits an int32 in bit/s.
        let want = doc! { "value": Bson::Int32(2_000_000), "unit": Bson::Int32(0) };
        assert_eq!(
            s0.get_document("ambr")
                .unwrap()
                .get_document("downlink")
                .unwrap(),
            &want
        );
        assert_eq!(
            d.get_document("ambr")
                .unwrap()
                .get_document("uplink")
                .unwrap(),
            &want
        );
        for (k, v) in [
            ("access_restriction_data", 32),
            ("subscriber_status", 0),
            ("operator_determined_barring", 0),
            ("network_access_mode", 0),
            ("subscribed_rau_tau_timer", 12),
        ] {
            assert_eq!(d.get(k), Some(&Bson::Int32(v)), "{k}");
        }
        assert_eq!(d.get_array("msisdn").unwrap().len(), 0);
    }

    #[test]
    fn any_dnn_and_no_cap_take_operator_defaults() {
        let mut p = profile();
        p.sd = "0000AB".into();
        p.default_dnns = vec!["internet".into(), "ims".into()];
        let d = document(&child(&[], None), &keys(), Amf::DEFAULT, Sqn::ZERO, &p);
        let slice = d.get_array("slice").unwrap()[0].as_document().unwrap();
        assert_eq!(slice.get_str("sd").unwrap(), "0000ab");
        assert_eq!(slice.get_array("session").unwrap().len(), 2);
        // 1 Gbit/s still fits an int32 in bit/s.
        let dl = d
            .get_document("ambr")
            .unwrap()
            .get_document("downlink")
            .unwrap();
        assert_eq!(
            dl,
            &doc! { "value": Bson::Int32(1_000_000_000), "unit": Bson::Int32(0) }
        );
    }

    #[test]
    fn bitrate_picks_a_unit_that_fits_int32() {
        assert_eq!(bitrate(1), doc! { "value": 1000, "unit": 0 });
        assert_eq!(
            bitrate(2_147_483),
            doc! { "value": 2_147_483_000, "unit": 0 }
        );
        assert_eq!(bitrate(2_147_484), doc! { "value": 2_147_484, "unit": 1 });
        assert_eq!(bitrate(u32::MAX), doc! { "value": 4_294_967, "unit": 2 });
    }

    #[test]
    fn unusable_credentials_are_absent() {
        let p = profile();
        let k = keys();
        let now = Timestamp(1500);
        let c = child(&[], None);
        let d = |c: &ChildCredential, ps| desired(c, ps, &k, Amf::DEFAULT, Sqn::ZERO, &p, now);
        assert!(d(&c, SubscriptionStatus::Active).is_present());
        assert_eq!(d(&c, SubscriptionStatus::Suspended), Desired::Absent);
        assert_eq!(d(&c, SubscriptionStatus::Revoked), Desired::Absent);
        let revoked = ChildCredential {
            status: ChildStatus::Revoked,
            ..c.clone()
        };
        assert_eq!(d(&revoked, SubscriptionStatus::Active), Desired::Absent);
        let expired = ChildCredential {
            expires_at: now,
            ..c.clone()
        };
        assert_eq!(d(&expired, SubscriptionStatus::Active), Desired::Absent);
    }

    #[test]
    fn security_is_written_on_insert_only() {
        let p = profile();
        let Desired::Present { set, set_on_insert } = desired(
            &child(&[], None),
            SubscriptionStatus::Active,
            &keys(),
            Amf::DEFAULT,
            Sqn::new(1 << 32).unwrap(),
            &p,
            Timestamp(1500),
        ) else {
            panic!("expected a document");
        };
        assert!(set.get("security").is_none());
        assert!(set.get("slice").is_some());
        let sec = set_on_insert.get_document("security").unwrap();
        assert_eq!(sec.get("sqn"), Some(&Bson::Int64(1 << 32)));
        assert_eq!(set_on_insert.len(), 1);
    }
}
