//! Compact, exact coding of sample values.
//!
//! Most metric values are integers (counts) or short decimals (milliseconds like
//! 123.45). An f64 costs 8 bytes, while a small integer takes one to three. So a value
//! that is exactly an integer, or exactly a number of thousandths, is coded as an integer
//! with a tag bit: `2k` for the integer `k`, `2m + 1` for `m / 1000`. Everything else
//! (and -0.0) stays an f64. Decoding is exact: a value is only coded as an integer when
//! the round trip gives the same bits. Sample runs store the tagged integer as a varint
//! (`run_codec`); the one-row-per-sample table before them stored it as a SQLite INTEGER,
//! which the migration to runs still reads (`decode`).

#[cfg(test)]
use rusqlite::types::Value;
use rusqlite::types::ValueRef;

/// Largest magnitude stored as a tagged integer (the doubled value stays below 2^53).
const LIMIT: f64 = (1u64 << 52) as f64;

/// The tagged integer that stands for `v` exactly, if there is one.
pub fn tagged(v: f64) -> Option<i64> {
    // `(x as i64) as f64 == x` tells a whole number below LIMIT as `fract` does, without
    // the call to libm's `trunc` that `fract` makes on baseline x86-64.
    if v.abs() < LIMIT && (v as i64) as f64 == v && !(v == 0.0 && v.is_sign_negative()) {
        return Some((v as i64) * 2);
    }
    let milli = v * 1000.0;
    if milli.abs() < LIMIT && (milli as i64) as f64 == milli {
        let m = milli as i64;
        if ((m as f64) / 1000.0).to_bits() == v.to_bits() {
            return Some(m * 2 + 1);
        }
    }
    None
}

/// The value a tagged integer stands for.
pub fn untagged(n: i64) -> f64 {
    if n & 1 == 0 {
        (n >> 1) as f64
    } else {
        ((n - 1) >> 1) as f64 / 1000.0
    }
}

/// The SQLite value a sample's value was stored as in the one-row-per-sample table
/// (before runs; the migration to runs and its tests still read and write it).
#[cfg(test)]
pub fn encode(v: f64) -> Value {
    tagged(v).map_or(Value::Real(v), Value::Integer)
}

pub fn decode(stored: ValueRef<'_>) -> f64 {
    match stored {
        ValueRef::Integer(n) => untagged(n),
        ValueRef::Real(v) => v,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(v: f64) -> f64 {
        let encoded = encode(v);
        let r = match &encoded {
            Value::Integer(n) => ValueRef::Integer(*n),
            Value::Real(f) => ValueRef::Real(*f),
            _ => unreachable!(),
        };
        decode(r)
    }

    #[test]
    fn common_values_become_small_integers() {
        assert_eq!(encode(120.0), Value::Integer(240));
        assert_eq!(encode(-3.0), Value::Integer(-6));
        assert_eq!(encode(123.45), Value::Integer(246_901));
        assert_eq!(encode(0.001), Value::Integer(3));
        assert_eq!(encode(-0.5), Value::Integer(-999));
        assert!(matches!(encode(0.1234), Value::Real(_)));
        assert!(matches!(encode(-0.0), Value::Real(_)));
        assert!(matches!(encode(1e300), Value::Real(_)));
        for v in [
            120.0,
            -3.0,
            123.45,
            0.001,
            -0.5,
            0.1234,
            -0.0,
            1e300,
            4503599627370495.0,
            -0.001,
            0.1,
            0.7,
        ] {
            assert_eq!(round_trip(v).to_bits(), v.to_bits(), "{v}");
        }
    }

    proptest! {
        #[test]
        fn any_finite_value_round_trips_exactly(v in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            prop_assert_eq!(round_trip(v).to_bits(), v.to_bits());
        }

        #[test]
        fn decimals_round_trip_exactly(m in -1_000_000_000_000i64..1_000_000_000_000) {
            let v = m as f64 / 1000.0;
            prop_assert_eq!(round_trip(v).to_bits(), v.to_bits());
        }
    }
}
