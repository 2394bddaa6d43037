//! Manufacturer attestation on the wire: the certificate chain a gateway forwards with a device's
//! batch items (`BatchItem` key 9, `docs/PROTOCOL.md` §4.5).
//!
//! The chain is the device's TLS client certificate chain as presented (leaf first). It is
//! checked by the CN, in `companion-transport`; this module fixes its encoding and size limits.

use minicbor::decode::{Decoder, Error as CborError};
use minicbor::encode::{Encoder, Error as EncError, Write};
use minicbor::{Decode, Encode};

use crate::codec::invalid;

/// Most certificates in a chain (leaf and intermediates).
pub const MAX_CHAIN_CERTS: usize = 4;
/// Most DER bytes in a chain, all certificates together.
pub const MAX_CHAIN_BYTES: usize = 16 * 1024;

/// A manufacturer certificate chain: a CBOR array of 1 to [`MAX_CHAIN_CERTS`] byte strings (DER
/// certificates, leaf first) of at most [`MAX_CHAIN_BYTES`] together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationChain(Vec<Vec<u8>>);

/// A chain that is empty or over the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an attestation chain holds 1 to {MAX_CHAIN_CERTS} certificates of at most {MAX_CHAIN_BYTES} bytes together (got {certs}, {bytes} bytes)"
)]
pub struct ChainSizeError {
    /// Certificates offered.
    pub certs: usize,
    /// Their bytes together.
    pub bytes: usize,
}

impl AttestationChain {
    /// Wraps `certs` (DER, leaf first) after checking the limits.
    pub fn new(certs: Vec<Vec<u8>>) -> Result<Self, ChainSizeError> {
        let bytes = certs.iter().map(Vec::len).sum();
        if certs.is_empty() || certs.len() > MAX_CHAIN_CERTS || bytes > MAX_CHAIN_BYTES {
            return Err(ChainSizeError {
                certs: certs.len(),
                bytes,
            });
        }
        Ok(Self(certs))
    }

    /// The certificates, leaf first.
    pub fn certs(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// The CBOR encoding (as in `BatchItem` key 9), for storage.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = minicbor::encode(self, &mut out);
        out
    }

    /// Decodes [`to_cbor`](Self::to_cbor)'s output, with the limits of the wire decoder.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, crate::DecodeError> {
        crate::codec::decode_body(bytes)
    }

    /// The certificates, leaf first, by value.
    pub fn into_certs(self) -> Vec<Vec<u8>> {
        self.0
    }
}

impl<C> Encode<C> for AttestationChain {
    fn encode<W: Write>(&self, e: &mut Encoder<W>, _: &mut C) -> Result<(), EncError<W::Error>> {
        e.array(self.0.len() as u64)?;
        for c in &self.0 {
            e.bytes(c)?;
        }
        Ok(())
    }
}

impl<'b, C> Decode<'b, C> for AttestationChain {
    fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, CborError> {
        let n = d
            .array()?
            .ok_or_else(|| invalid("attestation chain: indefinite-length array"))?;
        if n == 0 || n > MAX_CHAIN_CERTS as u64 {
            return Err(invalid(format!(
                "attestation chain of {n} certificates (1 to {MAX_CHAIN_CERTS})"
            )));
        }
        let mut certs = Vec::with_capacity(n as usize);
        let mut bytes = 0usize;
        for _ in 0..n {
            let c = d.bytes()?;
            bytes += c.len();
            if bytes > MAX_CHAIN_BYTES {
                return Err(invalid(format!(
                    "attestation chain over {MAX_CHAIN_BYTES} bytes"
                )));
            }
            certs.push(c.to_vec());
        }
        Ok(Self(certs))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chains_round_trip_within_limits_only() {
        let c = AttestationChain::new(vec![vec![0x30, 1], vec![0x30, 2]]).unwrap();
        let bytes = minicbor::to_vec(&c).unwrap();
        assert_eq!(bytes, [0x82, 0x42, 0x30, 1, 0x42, 0x30, 2]);
        assert_eq!(minicbor::decode::<AttestationChain>(&bytes).unwrap(), c);
        assert_eq!(c.to_cbor(), bytes);
        assert_eq!(AttestationChain::from_cbor(&bytes).unwrap(), c);
        assert!(AttestationChain::from_cbor(&bytes[..3]).is_err());
        assert!(AttestationChain::new(vec![]).is_err());
        assert!(AttestationChain::new(vec![vec![1]; MAX_CHAIN_CERTS + 1]).is_err());
        assert!(AttestationChain::new(vec![vec![1; MAX_CHAIN_BYTES + 1]]).is_err());
        // The decoder holds the same limits.
        assert!(minicbor::decode::<AttestationChain>(&[0x80]).is_err());
        let five = minicbor::to_vec(vec![minicbor::bytes::ByteVec::from(vec![1u8]); 5]).unwrap();
        assert!(minicbor::decode::<AttestationChain>(&five).is_err());
        let big = minicbor::to_vec(vec![
            minicbor::bytes::ByteVec::from(vec![1u8; 9000]),
            minicbor::bytes::ByteVec::from(vec![1u8; 9000]),
        ])
        .unwrap();
        assert!(minicbor::decode::<AttestationChain>(&big).is_err());
    }
}
