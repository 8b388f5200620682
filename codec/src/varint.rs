//! LEB128 variable-length integers, minimal encodings only.

use crate::DecodeError;

/// Appends `v` as unsigned LEB128.
#[inline]
pub(crate) fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Number of bytes `put` writes for `v`.
#[inline]
pub(crate) fn len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Reads an unsigned LEB128 at `*pos`, advancing it. Rejects encodings
/// longer than ten bytes, values over 64 bits and non-minimal encodings
/// (a final zero byte after the first), so each value has one encoding.
#[inline]
pub(crate) fn get(buf: &[u8], pos: &mut usize, what: &'static str) -> Result<u64, DecodeError> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    loop {
        let Some(&b) = buf.get(*pos) else {
            return Err(DecodeError::Truncated {
                what,
                needed: (*pos + 1) as u64,
                available: buf.len() as u64,
            });
        };
        *pos += 1;
        let bits = u64::from(b & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(DecodeError::BadVarint { what });
        }
        v |= bits << shift;
        if b & 0x80 == 0 {
            if b == 0 && shift > 0 {
                return Err(DecodeError::BadVarint { what });
            }
            return Ok(v);
        }
        shift += 7;
        if shift > 63 {
            return Err(DecodeError::BadVarint { what });
        }
    }
}

/// Zig-zag maps a signed difference to an unsigned value.
#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(v: u64) {
            let mut b = Vec::new();
            put(&mut b, v);
            prop_assert_eq!(b.len(), len(v));
            let mut pos = 0;
            prop_assert_eq!(get(&b, &mut pos, "t").unwrap(), v);
            prop_assert_eq!(pos, b.len());
        }

        #[test]
        fn zigzag_round_trip(v: i64) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }

        #[test]
        fn garbage_never_panics(b: Vec<u8>) {
            let mut pos = 0;
            let _ = get(&b, &mut pos, "t");
        }
    }

    #[test]
    fn rejects_bad_encodings() {
        let mut pos = 0;
        assert!(matches!(
            get(&[0x80, 0x00], &mut pos, "t"),
            Err(DecodeError::BadVarint { .. })
        ));
        let mut pos = 0;
        assert!(matches!(
            get(&[0xff; 10], &mut pos, "t"),
            Err(DecodeError::BadVarint { .. })
        ));
        let mut pos = 0;
        let mut max = vec![0xff; 9];
        max.push(0x01);
        assert_eq!(get(&max, &mut pos, "t").unwrap(), u64::MAX);
        let mut pos = 0;
        assert!(matches!(
            get(&[0x80], &mut pos, "t"),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
