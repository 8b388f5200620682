//! The fuzz crate's own sealing must make frames the decoder accepts, or
//! mutations never reach past the checksum.

use dwcp_codec::{CodecConfig, Decoder, Encoder, Policy, SessionKey};
use dwcp_codec_fuzz::reseal;

#[test]
fn resealed_chunk_frames_decode() {
    for key in [None, Some(SessionKey([9; 32]))] {
        let config = CodecConfig {
            key: key.clone(),
            ..CodecConfig::default()
        };
        for policy in [Policy::Stored, Policy::Datacenter] {
            let mut enc = Encoder::new(&config, policy).unwrap();
            let data = b"resealed chunk, resealed chunk, resealed chunk".repeat(40);
            let mut frame = Vec::new();
            enc.encode_chunk(&data, 3, &mut frame).unwrap();
            // Change the sequence number, then reseal: it must decode again.
            frame[28] ^= 1;
            reseal(&mut frame, key.as_ref());
            let mut dec = Decoder::new(&config);
            let (seq, bytes) = dec.decode_chunk(&frame).unwrap();
            assert_eq!((seq, bytes), (2, &data[..]));
        }
    }
}
