//! Test vectors the suites share.

/// The X25519 public keys whose shared secret is all-zero (RFC 7748 §6.1): 0, 1, the two
/// order-8 points, p − 1, p, p + 1, each also with bit 255 set (which X25519 ignores).
pub fn x25519_low_order_keys() -> Vec<[u8; 32]> {
    [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ]
    .iter()
    .flat_map(|h| {
        let k = hex32(h);
        let mut hi = k;
        hi[31] |= 0x80;
        [k, hi]
    })
    .collect()
}

/// 64 hex digits as 32 bytes (the constants above are well-formed).
fn hex32(h: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn fourteen_distinct_keys_with_and_without_bit_255() {
        let keys = super::x25519_low_order_keys();
        assert_eq!(keys.len(), 14);
        assert_eq!(keys[1][31], 0x80);
        assert_eq!(keys[2][0], 1);
        assert_eq!(keys[13][31], 0xff);
    }
}
