//! The USIM as seen by the companion: the [`Usim`] trait and [`SoftUsim`], a software USIM.
//!
//! [`Usim::authenticate`] is what a real USIM plus ME do for AUTHENTICATE in 5G context
//! (TS 31.102 §7.1.2.1; TS 33.501 §6.1.3.2 step 5–6; TS 33.102 §6.3.3):
//!
//! 1. AK = f5(RAND), SQN = (SQN ⊕ AK) ⊕ AK, XMAC = f1(SQN ‖ RAND ‖ AMF); XMAC ≠ MAC-A
//!    → [`UsimError::MacFailure`] (the UE answers "MAC failure").
//! 2. SQN not fresh (TS 33.102 Annex C.2.2, see [`SqnState`]) → [`UsimResponse::SyncFailure`]
//!    with AUTS (§6.3.3); the USIM's state does not change.
//! 3. The ME checks the AMF separation bit (TS 33.501 §6.1.3.2): not set →
//!    [`UsimError::AmfSeparationBit`] (state unchanged).
//! 4. Otherwise SEQ_MS(IND) := SEQ, and RES, CK, IK and RES* (TS 33.501 A.4) are returned.

use core::fmt;

use crate::Error;
use crate::aka::{self, AkaError, DELTA, IND_COUNT, SEQ_MAX, Sqn};
use crate::milenage::Milenage;
use crate::secret::Key128;

/// Result of a successful AUTHENTICATE, or a synchronisation failure with its AUTS.
#[derive(Clone)]
pub enum UsimResponse {
    /// AUTN verified and fresh.
    Success {
        /// RES (8 bytes for Milenage).
        res: Vec<u8>,
        /// RES* for the serving network name that was passed in.
        res_star: [u8; 16],
        /// The cipher key.
        ck: Key128,
        /// The integrity key.
        ik: Key128,
    },
    /// MAC-A verified but SQN was not acceptable: send AUTS to the home network.
    SyncFailure {
        /// (SQN_MS ⊕ AK*) ‖ MAC-S.
        auts: [u8; 14],
    },
}

impl fmt::Debug for UsimResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsimResponse::Success { ck, ik, .. } => f
                .debug_struct("Success")
                .field("res", &"<redacted>")
                .field("res_star", &"<redacted>")
                .field("ck", ck)
                .field("ik", ik)
                .finish(),
            UsimResponse::SyncFailure { auts } => f
                .debug_struct("SyncFailure")
                .field("auts", &hex::encode(auts))
                .finish(),
        }
    }
}

/// Why AUTHENTICATE failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UsimError {
    /// MAC-A did not verify: the network does not hold this subscriber's K, or AUTN was
    /// corrupted/forged (the UE sends "MAC failure", TS 24.501 §5.4.1.3.7).
    #[error("AUTN MAC verification failed")]
    MacFailure,
    /// The AMF separation bit is 0: the vector is not for 5G AKA (TS 33.501 §6.1.3.2; the UE
    /// sends "non-5G authentication unacceptable").
    #[error("AMF separation bit not set: not a 5G authentication vector")]
    AmfSeparationBit,
    /// The card or modem could not be reached or answered badly (PC/SC, AT+CSIM, ...).
    #[error("USIM unavailable: {0}")]
    Unavailable(String),
}

impl From<AkaError> for UsimError {
    fn from(e: AkaError) -> Self {
        match e {
            AkaError::MacFailure => UsimError::MacFailure,
            other => UsimError::Unavailable(other.to_string()),
        }
    }
}

/// A USIM able to run AUTHENTICATE in 5G context. Object safe (`Box<dyn Usim>`).
pub trait Usim: Send {
    /// The subscription permanent identifier, e.g. `imsi-001010123456789`.
    fn supi(&self) -> &str;
    /// Verifies AUTN for RAND and, if fresh, returns RES, RES* (for `snn`), CK and IK.
    fn authenticate(
        &mut self,
        rand: &[u8; 16],
        autn: &[u8; 16],
        snn: &str,
    ) -> Result<UsimResponse, UsimError>;
}

/// The USIM's sequence-number memory: the array SEQ_MS(0..32) of TS 33.102 Annex C.2.1.
///
/// Plain data for persistence (no serde): read it with [`SqnState::seq_ms`], rebuild it with
/// [`SqnState::new`]. All entries start at 0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SqnState {
    seq_ms: [u64; IND_COUNT],
}

impl SqnState {
    /// From stored SEQ_MS values; each must fit in 43 bits.
    pub fn new(seq_ms: [u64; IND_COUNT]) -> Result<Self, Error> {
        if let Some(bad) = seq_ms.iter().find(|s| **s > SEQ_MAX) {
            return Err(Error::SqnOutOfRange(*bad));
        }
        Ok(Self { seq_ms })
    }

    /// From a slice of exactly 32 stored SEQ_MS values.
    pub fn from_slice(seq_ms: &[u64]) -> Result<Self, Error> {
        let arr: [u64; IND_COUNT] = seq_ms.try_into().map_err(|_| Error::InvalidLength {
            expected: IND_COUNT,
            actual: seq_ms.len(),
        })?;
        Self::new(arr)
    }

    /// SEQ_MS(i) for i = 0..32.
    pub fn seq_ms(&self) -> &[u64; IND_COUNT] {
        &self.seq_ms
    }

    /// The highest SEQ accepted so far (0 if none).
    pub fn highest_seq(&self) -> u64 {
        self.seq_ms.iter().copied().max().unwrap_or(0)
    }

    /// SQN_MS as reported in AUTS: the highest accepted SEQ with the IND of the slot holding it
    /// (the lowest such slot if several do).
    pub fn sqn_ms(&self) -> Sqn {
        let highest = self.highest_seq();
        let ind = self.seq_ms.iter().position(|s| *s == highest).unwrap_or(0);
        Sqn::from_parts(highest, ind as u8).unwrap_or(Sqn::ZERO)
    }

    /// TS 33.102 C.2.2: SEQ > SEQ_MS(IND) and SEQ − max SEQ_MS ≤ Δ (L is not used).
    pub fn is_fresh(&self, sqn: Sqn) -> bool {
        let seq = sqn.seq();
        let slot = self.seq_ms[usize::from(sqn.ind()) % IND_COUNT];
        seq > slot && seq.saturating_sub(self.highest_seq()) <= DELTA
    }

    /// Records an accepted SQN: SEQ_MS(IND) := SEQ. Call only after [`SqnState::is_fresh`].
    fn accept(&mut self, sqn: Sqn) {
        self.seq_ms[usize::from(sqn.ind()) % IND_COUNT] = sqn.seq();
    }
}

/// A software USIM running Milenage with K and OPc, keeping the SEQ_MS array.
///
/// `Debug` shows only the SUPI. Persist [`SoftUsim::sqn_state`] after every successful
/// authentication and restore it with [`SoftUsim::with_sqn_state`], or replays become possible
/// across restarts.
pub struct SoftUsim {
    supi: String,
    milenage: Milenage,
    state: SqnState,
}

impl fmt::Debug for SoftUsim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftUsim")
            .field("supi", &self.supi)
            .field("milenage", &self.milenage)
            .field("highest_seq", &self.state.highest_seq())
            .finish()
    }
}

impl SoftUsim {
    /// A fresh USIM (all SEQ_MS = 0). `k` and `opc` are consumed and wiped when dropped.
    pub fn new(supi: String, k: Key128, opc: Key128) -> Self {
        Self {
            supi,
            milenage: Milenage::new(&k, &opc),
            state: SqnState::default(),
        }
    }

    /// Replaces the sequence-number memory with a stored one.
    pub fn with_sqn_state(mut self, state: SqnState) -> Self {
        self.state = state;
        self
    }

    /// The sequence-number memory, to persist.
    pub fn sqn_state(&self) -> SqnState {
        self.state.clone()
    }
}

impl Usim for SoftUsim {
    fn supi(&self) -> &str {
        &self.supi
    }

    fn authenticate(
        &mut self,
        rand: &[u8; 16],
        autn: &[u8; 16],
        snn: &str,
    ) -> Result<UsimResponse, UsimError> {
        let (sqn, amf) = aka::open_autn(&self.milenage, rand, autn)?;
        if !self.state.is_fresh(sqn) {
            let auts = aka::auts(&self.milenage, rand, self.state.sqn_ms());
            return Ok(UsimResponse::SyncFailure { auts });
        }
        if !aka::amf_separation_bit(&amf) {
            return Err(UsimError::AmfSeparationBit);
        }
        self.state.accept(sqn);
        let f = self.milenage.f2345(rand);
        let res_star = aka::res_star(&f.ck, &f.ik, snn, rand, &f.res);
        Ok(UsimResponse::Success {
            res: f.res.to_vec(),
            res_star,
            ck: f.ck,
            ik: f.ik,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aka::{
        AMF_5G, generate_vector, next_sqn, random_rand, serving_network_name, sqn_after_resync,
        verify_auts,
    };
    use crate::secret::ct_eq;
    use proptest::prelude::*;

    const SUPI: &str = "imsi-001010000000001";

    fn keys() -> (Key128, Key128) {
        // TS 35.208 test set 1.
        (
            Key128::from_hex("465b5ce8b199b49faa5f0a2ee238a6bc").unwrap(),
            Key128::from_hex("cd63cb71954a9f4e48a5994e37a02baf").unwrap(),
        )
    }

    fn success(r: UsimResponse) -> (Vec<u8>, [u8; 16], Key128, Key128) {
        match r {
            UsimResponse::Success {
                res,
                res_star,
                ck,
                ik,
            } => (res, res_star, ck, ik),
            other => panic!("expected success, got {other:?}"),
        }
    }

    #[test]
    fn full_aka_round_trip_with_resync_and_replay() {
        let (k, opc) = keys();
        let hn = Milenage::new(&k, &opc);
        let snn = serving_network_name("001", "01");
        let mut usim: Box<dyn Usim> = Box::new(SoftUsim::new(SUPI.into(), k.clone(), opc.clone()));
        assert_eq!(usim.supi(), SUPI);

        // 1. Normal authentication: RES* == XRES*, CK/IK agree.
        let mut hn_sqn = next_sqn(Sqn::ZERO);
        let v = generate_vector(&hn, hn_sqn, &AMF_5G, random_rand(), &snn);
        let (res, res_star, ck, ik) = success(usim.authenticate(&v.rand, &v.autn, &snn).unwrap());
        assert_eq!(res.len(), 8);
        assert!(v.verify_res_star(&res_star));
        assert_eq!(ck, v.ck);
        assert_eq!(ik, v.ik);

        // 2. Replayed AUTN is rejected (sync failure, never success).
        match usim.authenticate(&v.rand, &v.autn, &snn).unwrap() {
            UsimResponse::SyncFailure { auts } => {
                assert_eq!(
                    verify_auts(&hn, &v.rand, &auts).unwrap().seq(),
                    hn_sqn.seq()
                );
            }
            other => panic!("replay accepted: {other:?}"),
        }

        // 3. Wrong serving network name: still succeeds, but RES* no longer matches.
        hn_sqn = next_sqn(hn_sqn);
        let v2 = generate_vector(&hn, hn_sqn, &AMF_5G, random_rand(), &snn);
        let other_snn = serving_network_name("208", "93");
        let (_, rs2, _, _) = success(usim.authenticate(&v2.rand, &v2.autn, &other_snn).unwrap());
        assert!(!v2.verify_res_star(&rs2));
    }

    #[test]
    fn wrong_k_is_mac_failure() {
        let (k, opc) = keys();
        let mut usim = SoftUsim::new(SUPI.into(), k, opc.clone());
        let wrong = Milenage::new(&Key128::from_bytes([0x42; 16]), &opc);
        let v = generate_vector(&wrong, next_sqn(Sqn::ZERO), &AMF_5G, random_rand(), "5G:x");
        assert_eq!(
            usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap_err(),
            UsimError::MacFailure
        );
        // Also wrong OPc.
        let (k, _) = keys();
        let wrong = Milenage::new(&k, &Key128::from_bytes([0x42; 16]));
        let v = generate_vector(&wrong, next_sqn(Sqn::ZERO), &AMF_5G, random_rand(), "5G:x");
        assert_eq!(
            usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap_err(),
            UsimError::MacFailure
        );
        // State untouched by failures.
        assert_eq!(usim.sqn_state(), SqnState::default());
    }

    #[test]
    fn stale_sqn_resync_then_next_vector_accepted() {
        let (k, opc) = keys();
        let hn = Milenage::new(&k, &opc);
        let snn = serving_network_name("001", "01");
        // The USIM has already seen SEQ 5000 in slot 9 (e.g. the HN database was restored).
        let mut seq_ms = [0u64; IND_COUNT];
        seq_ms[9] = 5000;
        seq_ms[3] = 4990;
        let mut usim =
            SoftUsim::new(SUPI.into(), k, opc).with_sqn_state(SqnState::new(seq_ms).unwrap());

        let hn_sqn = Sqn::from_parts(10, 9).unwrap(); // stale
        let v = generate_vector(&hn, hn_sqn, &AMF_5G, random_rand(), &snn);
        let auts = match usim.authenticate(&v.rand, &v.autn, &snn).unwrap() {
            UsimResponse::SyncFailure { auts } => auts,
            other => panic!("stale SQN accepted: {other:?}"),
        };
        let sqn_ms = verify_auts(&hn, &v.rand, &auts).unwrap();
        assert_eq!(sqn_ms, Sqn::from_parts(5000, 9).unwrap());
        // A forged/corrupted AUTS is refused.
        let mut bad = auts;
        bad[13] ^= 1;
        assert_eq!(verify_auts(&hn, &v.rand, &bad), Err(AkaError::MacFailure));

        let hn_sqn = sqn_after_resync(sqn_ms);
        assert!(hn_sqn.seq() > 5000);
        let v = generate_vector(&hn, hn_sqn, &AMF_5G, random_rand(), &snn);
        let (_, res_star, _, _) = success(usim.authenticate(&v.rand, &v.autn, &snn).unwrap());
        assert!(ct_eq(&res_star, &v.xres_star));
        assert_eq!(usim.sqn_state().highest_seq(), hn_sqn.seq());
    }

    #[test]
    fn array_scheme_accepts_out_of_order_vectors_in_different_slots() {
        let (k, opc) = keys();
        let hn = Milenage::new(&k, &opc);
        let mut usim = SoftUsim::new(SUPI.into(), k, opc);
        // HN issues three vectors (different IND); they are used out of order.
        let s1 = next_sqn(Sqn::ZERO);
        let s2 = next_sqn(s1);
        let s3 = next_sqn(s2);
        let v: Vec<_> = [s1, s2, s3]
            .iter()
            .map(|s| generate_vector(&hn, *s, &AMF_5G, random_rand(), "5G:x"))
            .collect();
        for i in [2usize, 0, 1] {
            success(usim.authenticate(&v[i].rand, &v[i].autn, "5G:x").unwrap());
        }
        // Each one only once.
        for vi in &v {
            assert!(matches!(
                usim.authenticate(&vi.rand, &vi.autn, "5G:x").unwrap(),
                UsimResponse::SyncFailure { .. }
            ));
        }
    }

    #[test]
    fn delta_limit_and_persistence() {
        let (k, opc) = keys();
        let hn = Milenage::new(&k, &opc);
        let mut usim = SoftUsim::new(SUPI.into(), k.clone(), opc.clone());
        // A jump of more than Δ above the highest accepted SEQ is refused ...
        let far = Sqn::from_parts(DELTA + 1, 0).unwrap();
        let v = generate_vector(&hn, far, &AMF_5G, random_rand(), "5G:x");
        assert!(matches!(
            usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap(),
            UsimResponse::SyncFailure { .. }
        ));
        // ... exactly Δ is accepted.
        let edge = Sqn::from_parts(DELTA, 1).unwrap();
        let v = generate_vector(&hn, edge, &AMF_5G, random_rand(), "5G:x");
        success(usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap());

        // Persist and restore: the replay stays rejected in the restored USIM.
        let saved = usim.sqn_state();
        let restored = SqnState::from_slice(saved.seq_ms()).unwrap();
        let mut usim2 = SoftUsim::new(SUPI.into(), k, opc).with_sqn_state(restored);
        assert!(matches!(
            usim2.authenticate(&v.rand, &v.autn, "5G:x").unwrap(),
            UsimResponse::SyncFailure { .. }
        ));
        assert!(SqnState::from_slice(&[0; 31]).is_err());
        let mut too_big = [0u64; IND_COUNT];
        too_big[0] = SEQ_MAX + 1;
        assert!(SqnState::new(too_big).is_err());
    }

    #[test]
    fn non_5g_amf_rejected_without_state_change() {
        let (k, opc) = keys();
        let hn = Milenage::new(&k, &opc);
        let mut usim = SoftUsim::new(SUPI.into(), k, opc);
        let v = generate_vector(
            &hn,
            next_sqn(Sqn::ZERO),
            &[0x00, 0x00],
            random_rand(),
            "5G:x",
        );
        assert_eq!(
            usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap_err(),
            UsimError::AmfSeparationBit
        );
        assert_eq!(usim.sqn_state(), SqnState::default());
    }

    #[test]
    fn garbage_autn_never_panics() {
        let (k, opc) = keys();
        let mut usim = SoftUsim::new(SUPI.into(), k, opc);
        for b in [0u8, 0xff, 0x5a] {
            assert_eq!(
                usim.authenticate(&[b; 16], &[b; 16], "").unwrap_err(),
                UsimError::MacFailure
            );
        }
    }

    #[test]
    fn debug_redacts() {
        let (k, opc) = keys();
        let mut usim = SoftUsim::new(SUPI.into(), k, opc);
        let s = format!("{usim:?}");
        assert!(s.contains(SUPI));
        assert!(!s.contains("465b5ce8") && !s.contains("cd63cb71"), "{s}");
        let hn = Milenage::new(&keys().0, &keys().1);
        let v = generate_vector(&hn, next_sqn(Sqn::ZERO), &AMF_5G, [7; 16], "5G:x");
        let r = usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap();
        let s = format!("{r:?}");
        assert!(!s.contains(&hex::encode(v.ck.expose())), "{s}");
        assert!(!s.contains(&hex::encode(v.xres_star)), "{s}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn prop_round_trip(k in any::<[u8; 16]>(), opc in any::<[u8; 16]>(),
                           seq in 1u64..=SEQ_MAX, ind in 0u8..32, rand in any::<[u8; 16]>()) {
            let k = Key128::from_bytes(k);
            let opc = Key128::from_bytes(opc);
            let hn = Milenage::new(&k, &opc);
            let sqn = Sqn::from_parts(seq, ind).unwrap();
            // Start the USIM just below the HN's SEQ so Δ is respected.
            let mut seq_ms = [0u64; IND_COUNT];
            seq_ms[usize::from((ind + 1) % 32)] = seq - 1;
            let mut usim = SoftUsim::new(SUPI.into(), k.clone(), opc.clone())
                .with_sqn_state(SqnState::new(seq_ms).unwrap());
            let snn = "5G:mnc001.mcc001.3gppnetwork.org";
            let v = generate_vector(&hn, sqn, &AMF_5G, rand, snn);
            let (_, rs, ck, ik) = success(usim.authenticate(&v.rand, &v.autn, snn).unwrap());
            prop_assert!(v.verify_res_star(&rs));
            prop_assert_eq!(ck, v.ck.clone());
            prop_assert_eq!(ik, v.ik.clone());
            // Replay → AUTS → HN recovers exactly SQN_MS, and the next vector works.
            let auts = match usim.authenticate(&v.rand, &v.autn, snn).unwrap() {
                UsimResponse::SyncFailure { auts } => auts,
                other => panic!("replay accepted: {other:?}"),
            };
            let sqn_ms = verify_auts(&hn, &v.rand, &auts).unwrap();
            prop_assert_eq!(sqn_ms, usim.sqn_state().sqn_ms());
            prop_assert_eq!(sqn_ms.seq(), seq);
            if seq < SEQ_MAX {
                let next = sqn_after_resync(sqn_ms);
                let v2 = generate_vector(&hn, next, &AMF_5G, rand, snn);
                let (_, rs2, _, _) = success(usim.authenticate(&v2.rand, &v2.autn, snn).unwrap());
                prop_assert!(v2.verify_res_star(&rs2));
            }
        }

        #[test]
        fn prop_verify_auts_total(k in any::<[u8; 16]>(), rand in any::<[u8; 16]>(),
                                  auts in any::<[u8; 14]>()) {
            let m = Milenage::new(&Key128::from_bytes(k), &Key128::from_bytes([0; 16]));
            // Never panics; a random AUTS essentially never verifies.
            let _ = verify_auts(&m, &rand, &auts);
        }
    }
}
