//! CBOR codec for the credential bundle's K and OPc, held in
//! [`companion_crypto::secret::Key128`] (zeroized on drop, redacted `Debug`, constant-time `==`).

pub use companion_crypto::secret::Key128;

/// `with = "crate::secret::key128"`: a 16-byte byte string straight into a [`Key128`].
pub(crate) mod key128 {
    use minicbor::decode::{Decoder, Error as CborError};
    use minicbor::encode::{Encoder, Error as EncError, Write};

    use super::Key128;

    pub(crate) fn encode<Ctx, W: Write>(
        k: &Key128,
        e: &mut Encoder<W>,
        _: &mut Ctx,
    ) -> Result<(), EncError<W::Error>> {
        e.bytes(k.expose())?;
        Ok(())
    }

    pub(crate) fn decode<Ctx>(d: &mut Decoder<'_>, _: &mut Ctx) -> Result<Key128, CborError> {
        let b = d.bytes()?;
        // Copies straight from the (caller-owned) plaintext into the zeroizing key.
        Key128::from_slice(b)
            .map_err(|_| crate::codec::invalid(format!("key of {} bytes, expected 16", b.len())))
    }
}
