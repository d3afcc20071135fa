//! LEB128 varints and zigzag coding for the compact binary formats the store keeps
//! (histogram sketches, sample runs), whose small numbers, and small differences of
//! either sign, take one byte; the protobuf reader (`protowire`) reads its varints here
//! too.

/// Maps small negative and positive numbers alike to small unsigned ones.
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v`, seven bits per byte, low bits first.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads one varint from the front of `input` and advances past it; `None` when the
/// input ends inside it or it runs past 64 bits.
#[inline]
pub fn get(input: &mut &[u8]) -> Option<u64> {
    // Most varints (keys, short lengths, small deltas) take one byte.
    if let Some((&byte, rest)) = input.split_first()
        && byte < 0x80
    {
        *input = rest;
        return Some(u64::from(byte));
    }
    get_long(input)
}

fn get_long(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        // The tenth byte holds bit 63 only.
        if shift == 63 && byte > 1 {
            return None;
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_numbers_take_one_byte() {
        for v in [0i64, 1, -1, 63, -64] {
            let mut out = Vec::new();
            put(&mut out, zigzag(v));
            assert_eq!(out.len(), 1, "{v}");
        }
        assert_eq!(get(&mut &[0x80u8][..]), None);
        assert_eq!(get(&mut &[0xffu8; 10][..]), None);
        let mut max = [0xffu8; 10];
        max[9] = 0x01;
        assert_eq!(get(&mut &max[..]), Some(u64::MAX));
        // Bits past the 64th are refused, not dropped.
        max[9] = 0x7f;
        assert_eq!(get(&mut &max[..]), None);
    }

    proptest! {
        #[test]
        fn round_trip(v in any::<i64>(), tail in any::<u8>()) {
            let mut out = Vec::new();
            put(&mut out, zigzag(v));
            out.push(tail);
            let mut input = &out[..];
            prop_assert_eq!(get(&mut input).map(unzigzag), Some(v));
            prop_assert_eq!(input, &[tail][..]);
        }
    }
}
