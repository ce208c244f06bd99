//! Arbitrary bytes into `Envelope::decode`: decoding is total (a typed error, never a panic), and
//! whatever decodes survives encode → decode unchanged, with a stable encoding.

#![no_main]

use libfuzzer_sys::fuzz_target;
use purista_core::Envelope;

fuzz_target!(|data: &[u8]| {
    let Ok(first) = Envelope::decode(data) else {
        return;
    };
    let bytes = first.encode();
    // Re-encoding may grow the text (`1e5` becomes `100000.0`): no size limit on the way back.
    let second = match Envelope::decode_with_limit(&bytes, usize::MAX) {
        Ok(e) => e,
        Err(err) => panic!(
            "an encoded envelope does not decode: {err}\n{}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    assert_eq!(second, first, "encode → decode changed the envelope");
    assert_eq!(second.encode(), bytes, "the encoding is not stable");
});
