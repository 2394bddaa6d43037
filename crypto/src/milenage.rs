//! The MILENAGE algorithm set, 3GPP TS 35.206 §4 (AES-128 as the kernel function E_K).
//!
//! With `TEMP = E_K(RAND ⊕ OPc)` and `rot(x, r)` the cyclic rotation of the 128-bit `x` by `r`
//! bits towards the most significant bit (TS 35.206 §4.1):
//!
//! ```text
//! IN1  = SQN || AMF || SQN || AMF
//! OUT1 = E_K(TEMP ⊕ rot(IN1 ⊕ OPc, r1) ⊕ c1) ⊕ OPc    f1 = OUT1[0..64], f1* = OUT1[64..128]
//! OUT2 = E_K(rot(TEMP ⊕ OPc, r2) ⊕ c2) ⊕ OPc          f5 = OUT2[0..48], f2 = OUT2[64..128]
//! OUT3 = E_K(rot(TEMP ⊕ OPc, r3) ⊕ c3) ⊕ OPc          f3 = OUT3
//! OUT4 = E_K(rot(TEMP ⊕ OPc, r4) ⊕ c4) ⊕ OPc          f4 = OUT4
//! OUT5 = E_K(rot(TEMP ⊕ OPc, r5) ⊕ c5) ⊕ OPc          f5* = OUT5[0..48]
//! r1 = 64, r2 = 0, r3 = 32, r4 = 64, r5 = 96; c1 = 0, c2 = 1, c3 = 2, c4 = 4, c5 = 8
//! OPc = OP ⊕ E_K(OP)
//! ```
//!
//! Conformance data: TS 35.208 §4.3, test sets 1–6 (tests below).

use core::fmt;

use aes::Aes128;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Key128;

const R1: u32 = 64;
const R2: u32 = 0;
const R3: u32 = 32;
const R4: u32 = 64;
const R5: u32 = 96;
const C1: u128 = 0;
const C2: u128 = 1;
const C3: u128 = 2;
const C4: u128 = 4;
const C5: u128 = 8;

/// A subscriber's Milenage instance: the AES key schedule of K and OPc, both wiped on drop.
#[derive(Clone)]
pub struct Milenage {
    /// AES-128 with key K (the `aes` crate zeroizes its round keys on drop).
    cipher: Aes128,
    opc: Key128,
}

/// Outputs of f2, f3, f4 and f5 for one RAND. `ck`/`ik` zeroize themselves; `Debug` is redacted.
#[derive(Clone)]
pub struct F2345 {
    /// f2: RES (64 bits in Milenage).
    pub res: [u8; 8],
    /// f3: the cipher key CK.
    pub ck: Key128,
    /// f4: the integrity key IK.
    pub ik: Key128,
    /// f5: the anonymity key AK.
    pub ak: [u8; 6],
}

impl fmt::Debug for F2345 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("F2345")
            .field("res", &"<redacted>")
            .field("ck", &self.ck)
            .field("ik", &self.ik)
            .field("ak", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for Milenage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Milenage(<redacted>)")
    }
}

fn aes_encrypt(cipher: &Aes128, input: u128) -> Zeroizing<u128> {
    let mut block = Zeroizing::new(input.to_be_bytes());
    cipher.encrypt_block((&mut *block).into());
    Zeroizing::new(u128::from_be_bytes(*block))
}

impl Milenage {
    /// A Milenage instance for subscriber key `k` and operator variant `opc`.
    pub fn new(k: &Key128, opc: &Key128) -> Self {
        Self {
            cipher: Aes128::new(k.expose().into()),
            opc: opc.clone(),
        }
    }

    /// OPc = E_K(OP) ⊕ OP (TS 35.206 §4.1).
    pub fn compute_opc(k: &Key128, op: &[u8; 16]) -> Key128 {
        let cipher = Aes128::new(k.expose().into());
        let op = u128::from_be_bytes(*op);
        let mut opc = *aes_encrypt(&cipher, op) ^ op;
        let out = Key128::from_bytes(opc.to_be_bytes());
        opc.zeroize();
        out
    }

    fn opc(&self) -> u128 {
        u128::from_be_bytes(*self.opc.expose())
    }

    /// TEMP = E_K(RAND ⊕ OPc).
    fn temp(&self, rand: &[u8; 16]) -> Zeroizing<u128> {
        aes_encrypt(&self.cipher, u128::from_be_bytes(*rand) ^ self.opc())
    }

    /// OUTn for n = 2..5: E_K(rot(TEMP ⊕ OPc, r) ⊕ c) ⊕ OPc.
    fn out(&self, temp: u128, r: u32, c: u128) -> Zeroizing<u128> {
        let opc = self.opc();
        let x = Zeroizing::new((temp ^ opc).rotate_left(r) ^ c);
        Zeroizing::new(*aes_encrypt(&self.cipher, *x) ^ opc)
    }

    /// OUT1 = E_K(TEMP ⊕ rot(IN1 ⊕ OPc, r1) ⊕ c1) ⊕ OPc.
    fn out1(&self, rand: &[u8; 16], sqn: &[u8; 6], amf: &[u8; 2]) -> Zeroizing<u128> {
        let temp = self.temp(rand);
        let mut in1 = [0u8; 16];
        in1[0..6].copy_from_slice(sqn);
        in1[6..8].copy_from_slice(amf);
        in1[8..14].copy_from_slice(sqn);
        in1[14..16].copy_from_slice(amf);
        let opc = self.opc();
        let x = Zeroizing::new(*temp ^ (u128::from_be_bytes(in1) ^ opc).rotate_left(R1) ^ C1);
        Zeroizing::new(*aes_encrypt(&self.cipher, *x) ^ opc)
    }

    /// f1: the network authentication code MAC-A.
    pub fn f1(&self, rand: &[u8; 16], sqn: &[u8; 6], amf: &[u8; 2]) -> [u8; 8] {
        let out1 = Zeroizing::new(self.out1(rand, sqn, amf).to_be_bytes());
        first8(&out1)
    }

    /// f1*: the resynchronisation authentication code MAC-S.
    pub fn f1_star(&self, rand: &[u8; 16], sqn: &[u8; 6], amf: &[u8; 2]) -> [u8; 8] {
        let out1 = Zeroizing::new(self.out1(rand, sqn, amf).to_be_bytes());
        last8(&out1)
    }

    /// f2 (RES), f3 (CK), f4 (IK) and f5 (AK) for `rand`.
    pub fn f2345(&self, rand: &[u8; 16]) -> F2345 {
        let temp = self.temp(rand);
        let out2 = Zeroizing::new(self.out(*temp, R2, C2).to_be_bytes());
        let out3 = self.out(*temp, R3, C3);
        let out4 = self.out(*temp, R4, C4);
        F2345 {
            res: last8(&out2),
            ck: Key128::from_bytes(out3.to_be_bytes()),
            ik: Key128::from_bytes(out4.to_be_bytes()),
            ak: first6(&out2),
        }
    }

    /// f5 alone: the anonymity key AK that conceals SQN in AUTN.
    pub fn f5(&self, rand: &[u8; 16]) -> [u8; 6] {
        let temp = self.temp(rand);
        let out2 = Zeroizing::new(self.out(*temp, R2, C2).to_be_bytes());
        first6(&out2)
    }

    /// f5*: the anonymity key AK* that conceals SQN_MS in AUTS.
    pub fn f5_star(&self, rand: &[u8; 16]) -> [u8; 6] {
        let temp = self.temp(rand);
        let out5 = Zeroizing::new(self.out(*temp, R5, C5).to_be_bytes());
        first6(&out5)
    }
}

fn first8(b: &[u8; 16]) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[0..8]);
    o
}

fn last8(b: &[u8; 16]) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[8..16]);
    o
}

fn first6(b: &[u8; 16]) -> [u8; 6] {
    let mut o = [0u8; 6];
    o.copy_from_slice(&b[0..6]);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        let mut o = [0u8; N];
        hex::decode_to_slice(s, &mut o).unwrap();
        o
    }

    struct TestSet {
        k: &'static str,
        rand: &'static str,
        sqn: &'static str,
        amf: &'static str,
        op: &'static str,
        opc: &'static str,
        f1: &'static str,
        f1_star: &'static str,
        f2: &'static str,
        f3: &'static str,
        f4: &'static str,
        f5: &'static str,
        f5_star: &'static str,
    }

    // 3GPP TS 35.208 §4.3, test sets 1–6 (the same values are used by the conformance tests of
    // free5gc/util milenage/milenage_test.go, and of osmocom/CryptoMobile; test set 1 is also
    // quoted in the project brief).
    const SETS: [TestSet; 6] = [
        TestSet {
            k: "465b5ce8b199b49faa5f0a2ee238a6bc",
            rand: "23553cbe9637a89d218ae64dae47bf35",
            sqn: "ff9bb4d0b607",
            amf: "b9b9",
            op: "cdc202d5123e20f62b6d676ac72cb318",
            opc: "cd63cb71954a9f4e48a5994e37a02baf",
            f1: "4a9ffac354dfafb3",
            f1_star: "01cfaf9ec4e871e9",
            f2: "a54211d5e3ba50bf",
            f3: "b40ba9a3c58b2a05bbf0d987b21bf8cb",
            f4: "f769bcd751044604127672711c6d3441",
            f5: "aa689c648370",
            f5_star: "451e8beca43b",
        },
        TestSet {
            k: "0396eb317b6d1c36f19c1c84cd6ffd16",
            rand: "c00d603103dcee52c4478119494202e8",
            sqn: "fd8eef40df7d",
            amf: "af17",
            op: "ff53bade17df5d4e793073ce9d7579fa",
            opc: "53c15671c60a4b731c55b4a441c0bde2",
            f1: "5df5b31807e258b0",
            f1_star: "a8c016e51ef4a343",
            f2: "d3a628ed988620f0",
            f3: "58c433ff7a7082acd424220f2b67c556",
            f4: "21a8c1f929702adb3e738488b9f5c5da",
            f5: "c47783995f72",
            f5_star: "30f1197061c1",
        },
        TestSet {
            k: "fec86ba6eb707ed08905757b1bb44b8f",
            rand: "9f7c8d021accf4db213ccff0c7f71a6a",
            sqn: "9d0277595ffc",
            amf: "725c",
            op: "dbc59adcb6f9a0ef735477b7fadf8374",
            opc: "1006020f0a478bf6b699f15c062e42b3",
            f1: "9cabc3e99baf7281",
            f1_star: "95814ba2b3044324",
            f2: "8011c48c0c214ed2",
            f3: "5dbdbb2954e8f3cde665b046179a5098",
            f4: "59a92d3b476a0443487055cf88b2307b",
            f5: "33484dc2136b",
            f5_star: "deacdd848cc6",
        },
        TestSet {
            k: "9e5944aea94b81165c82fbf9f32db751",
            rand: "ce83dbc54ac0274a157c17f80d017bd6",
            sqn: "0b604a81eca8",
            amf: "9e09",
            op: "223014c5806694c007ca1eeef57f004f",
            opc: "a64a507ae1a2a98bb88eb4210135dc87",
            f1: "74a58220cba84c49",
            f1_star: "ac2cc74a96871837",
            f2: "f365cd683cd92e96",
            f3: "e203edb3971574f5a94b0d61b816345d",
            f4: "0c4524adeac041c4dd830d20854fc46b",
            f5: "f0b9c08ad02e",
            f5_star: "6085a86c6f63",
        },
        TestSet {
            k: "4ab1deb05ca6ceb051fc98e77d026a84",
            rand: "74b0cd6031a1c8339b2b6ce2b8c4a186",
            sqn: "e880a1b580b6",
            amf: "9f07",
            op: "2d16c5cd1fdf6b22383584e3bef2a8d8",
            opc: "dcf07cbd51855290b92a07a9891e523e",
            f1: "49e785dd12626ef2",
            f1_star: "9e85790336bb3fa2",
            f2: "5860fc1bce351e7e",
            f3: "7657766b373d1c2138f307e3de9242f9",
            f4: "1c42e960d89b8fa99f2744e0708ccb53",
            f5: "31e11a609118",
            f5_star: "fe2555e54aa9",
        },
        TestSet {
            k: "6c38a116ac280c454f59332ee35c8c4f",
            rand: "ee6466bc96202c5a557abbeff8babf63",
            sqn: "414b98222181",
            amf: "4464",
            op: "1ba00a1a7c6700ac8c3ff3e96ad08725",
            opc: "3803ef5363b947c6aaa225e58fae3934",
            f1: "078adfb488241a57",
            f1_star: "80246b8d0186bcf1",
            f2: "16c8233f05a0ac28",
            f3: "3f8c7587fe8e4b233af676aede30ba3b",
            f4: "a7466cc1e6b2a1337d49d3b66e95d7b4",
            f5: "45b0f69ab06c",
            f5_star: "1f53cd2b1113",
        },
    ];

    #[test]
    fn ts_35_208_test_sets_1_to_6() {
        for (i, t) in SETS.iter().enumerate() {
            let n = i + 1;
            let k = Key128::from_hex(t.k).unwrap();
            let opc = Milenage::compute_opc(&k, &h(t.op));
            assert_eq!(hex::encode(opc.expose()), t.opc, "OPc, set {n}");
            let m = Milenage::new(&k, &opc);
            let rand: [u8; 16] = h(t.rand);
            let sqn: [u8; 6] = h(t.sqn);
            let amf: [u8; 2] = h(t.amf);
            assert_eq!(hex::encode(m.f1(&rand, &sqn, &amf)), t.f1, "f1, set {n}");
            assert_eq!(
                hex::encode(m.f1_star(&rand, &sqn, &amf)),
                t.f1_star,
                "f1*, set {n}"
            );
            let o = m.f2345(&rand);
            assert_eq!(hex::encode(o.res), t.f2, "f2, set {n}");
            assert_eq!(hex::encode(o.ck.expose()), t.f3, "f3, set {n}");
            assert_eq!(hex::encode(o.ik.expose()), t.f4, "f4, set {n}");
            assert_eq!(hex::encode(o.ak), t.f5, "f5, set {n}");
            assert_eq!(hex::encode(m.f5(&rand)), t.f5, "f5 alone, set {n}");
            assert_eq!(hex::encode(m.f5_star(&rand)), t.f5_star, "f5*, set {n}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let t = &SETS[0];
        let k = Key128::from_hex(t.k).unwrap();
        let opc = Key128::from_hex(t.opc).unwrap();
        let m = Milenage::new(&k, &opc);
        let s = format!("{m:?} {:?}", m.f2345(&h(t.rand)));
        for secret in [t.k, t.opc, t.f2, t.f3, t.f4, t.f5] {
            assert!(!s.contains(secret), "{s}");
        }
    }
}
