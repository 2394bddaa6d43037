//! CBOR helpers shared by the message types: body decoding with typed errors, fixed-size byte
//! strings, and "open" enumerations that keep unknown codes.

use minicbor::decode::{Decoder, Error as CborError};
use minicbor::encode::{Encoder, Error as EncError, Write};

use crate::error::{DecodeError, EncodeError};

/// A field value that is well-formed CBOR but not acceptable (bad length, bad characters...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidValue(pub(crate) String);

pub(crate) fn invalid(msg: impl Into<String>) -> CborError {
    CborError::custom(InvalidValue(msg.into()))
}

/// Maps a `minicbor` decode error to the crate's typed error.
pub(crate) fn classify(e: &CborError) -> DecodeError {
    let detail = e.to_string();
    if e.is_end_of_input() {
        DecodeError::Truncated
    } else if e.is_type_mismatch() || e.is_tag_mismatch() {
        DecodeError::WrongType(detail)
    } else if e.is_missing_value() {
        DecodeError::MissingField(detail)
    } else if e.is_custom() || e.is_unknown_variant() {
        DecodeError::InvalidValue(detail)
    } else {
        DecodeError::Malformed(detail)
    }
}

/// Decodes one CBOR data item filling `body` exactly.
pub(crate) fn decode_body<'b, T: minicbor::Decode<'b, ()>>(
    body: &'b [u8],
) -> Result<T, DecodeError> {
    let mut d = Decoder::new(body);
    let v = d.decode::<T>().map_err(|e| classify(&e))?;
    let used = d.position();
    if used != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(v)
}

/// Encodes a value to its deterministic CBOR bytes.
pub(crate) fn encode_body<T: minicbor::Encode<()>>(v: &T) -> Result<Vec<u8>, EncodeError> {
    minicbor::to_vec(v).map_err(|e| EncodeError::Cbor(e.to_string()))
}

/// `with = "crate::codec::fixed"`: `[u8; N]` as a byte string of exactly N bytes.
pub(crate) mod fixed {
    use super::*;

    pub(crate) fn encode<Ctx, W: Write, const N: usize>(
        v: &[u8; N],
        e: &mut Encoder<W>,
        _: &mut Ctx,
    ) -> Result<(), EncError<W::Error>> {
        e.bytes(v)?;
        Ok(())
    }

    pub(crate) fn decode<Ctx, const N: usize>(
        d: &mut Decoder<'_>,
        _: &mut Ctx,
    ) -> Result<[u8; N], CborError> {
        let b = d.bytes()?;
        <[u8; N]>::try_from(b)
            .map_err(|_| invalid(format!("byte string of {} bytes, expected {N}", b.len())))
    }
}

/// An enumeration carried as an unsigned integer that keeps codes it does not know
/// (`Unknown(code)`), so new codes do not break old peers.
macro_rules! open_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $var:ident = $code:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vm])* $var,)*
            /// A code this implementation does not know.
            Unknown(u64),
        }

        impl $name {
            /// Every known value.
            pub const KNOWN: &[$name] = &[$($name::$var,)*];

            /// The wire code.
            pub const fn code(self) -> u64 {
                match self {
                    $($name::$var => $code,)*
                    $name::Unknown(c) => c,
                }
            }

            /// The value for a wire code.
            pub const fn from_code(code: u64) -> Self {
                match code {
                    $($code => $name::$var,)*
                    c => $name::Unknown(c),
                }
            }
        }

        impl<C> minicbor::Encode<C> for $name {
            fn encode<W: minicbor::encode::Write>(
                &self,
                e: &mut minicbor::Encoder<W>,
                _: &mut C,
            ) -> Result<(), minicbor::encode::Error<W::Error>> {
                e.u64(self.code())?;
                Ok(())
            }
        }

        impl<'b, C> minicbor::Decode<'b, C> for $name {
            fn decode(d: &mut minicbor::Decoder<'b>, _: &mut C) -> Result<Self, minicbor::decode::Error> {
                d.u64().map($name::from_code)
            }
        }
    };
}
pub(crate) use open_enum;
