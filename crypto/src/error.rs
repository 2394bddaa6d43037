//! Crate-level error type for parsing and range errors.

/// Errors from parsing or validating inputs (hex strings, lengths, ranges, identifiers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hex string was not valid hex or had the wrong length. The offending text is not
    /// included, since it may be key material.
    #[error("invalid hex: expected {expected_len} hex digits")]
    InvalidHex {
        /// Number of hex digits expected.
        expected_len: usize,
    },
    /// A byte string had the wrong length.
    #[error("invalid length: expected {expected} bytes, got {actual}")]
    InvalidLength {
        /// Expected length in bytes.
        expected: usize,
        /// Actual length in bytes.
        actual: usize,
    },
    /// A sequence number does not fit in 48 bits (or a SEQ does not fit in 43 bits, or an IND in 5).
    #[error("sequence number out of range: {0:#x}")]
    SqnOutOfRange(u64),
    /// An MCC or MNC is not 3 (MCC) or 2–3 (MNC) decimal digits.
    #[error("invalid PLMN identity: MCC must be 3 digits and MNC 2 or 3 digits")]
    InvalidPlmn,
    /// A KDF parameter is longer than the 16-bit length field of TS 33.220 Annex B can express.
    #[error("KDF parameter too long: {0} bytes (max 65535)")]
    KdfParamTooLong(usize),
    /// The operating system's random number generator failed.
    #[error("OS random number generator failed")]
    Rng,
}
