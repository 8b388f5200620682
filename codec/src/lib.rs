//! HDE, hierarchical delta encoding: dwcp's codec for pages and chunks.
//!
//! Sans-IO: bytes in, bytes out, no sockets, threads or rings. For each page
//! of a batch the [`Encoder`] picks the cheapest form the receiver can
//! rebuild, checking the cheap cases first:
//!
//! 1. **zero**: a tag (runs of zero pages are one entry);
//! 2. **delta**: the receiver holds an older version of this page: XOR
//!    against it, zero-run-length encoded ([`delta`]), when smaller than the
//!    page is expected to compress to;
//! 3. **reference**: the receiver holds this content already, sent earlier
//!    in the session (found by a sampled fingerprint, confirmed byte for
//!    byte) or listed in its [`Baseline`] (confirmed by BLAKE3-128 hash);
//! 4. **raw**: batched with the frame's other raw pages (and the delta
//!    bodies) into one block compressed per the [`Policy`]: LZ4
//!    (`datacenter`), ZStd (`internet`), or whichever delivers the most bytes
//!    per second on the link (`auto`); stored when it does not shrink.
//!
//! Both ends keep the same bounded state ([`CodecConfig::state_limit`]
//! bytes): a ring of recent page contents that they fill and evict
//! identically, so references and deltas never name something the receiver
//! lacks. Frames carry a BLAKE3 checksum, keyed with the session key when
//! there is one (page frames inside a container that verifies them may
//! leave it out: [`Encoder::set_page_checksums`]); the [`Decoder`] rejects
//! every malformed frame with a [`DecodeError`], never panics, and never
//! allocates past its [`DecodeLimits`]. The byte format is in `docs/wire-format.md`.
//!
//! ```
//! use dwcp_codec::{CodecConfig, Decoder, DecodedPage, Encoder, PageRef, Policy};
//!
//! let config = CodecConfig::default();
//! let mut enc = Encoder::new(&config, Policy::Datacenter)?;
//! let mut dec = Decoder::new(&config);
//!
//! let text = b"live migration moves pages ".repeat(152);
//! let pages = [
//!     PageRef { index: 7, data: &[0u8; 4096] },
//!     PageRef { index: 8, data: &text[..4096] },
//! ];
//! let mut frame = Vec::new();
//! let stats = enc.encode_pages(&pages, &mut frame)?;
//! assert_eq!((stats.zero, stats.raw), (1, 1));
//!
//! let decoded = dec.decode_pages(&frame)?;
//! let got: Vec<DecodedPage<'_>> = decoded.iter().collect();
//! assert_eq!(got[0], DecodedPage::Zero { first: 7, count: 1 });
//! assert_eq!(got[1], DecodedPage::Data { index: 8, bytes: &text[..4096] });
//! # Ok::<(), dwcp_codec::CodecError>(())
//! ```

mod baseline;
mod compress;
pub mod corpus;
mod decoder;
pub mod delta;
mod encoder;
mod error;
pub mod frame;
#[doc(hidden)]
pub mod lz4;
mod page;
mod store;
mod table;
mod varint;

pub use baseline::{Baseline, BaselineAdvert};
pub use compress::{
    AUTO_CANDIDATES, Compression, DEFAULT_INTERNET_LEVEL, Estimate, MAX_ZSTD_LEVEL, Method, Policy,
    ThreadCpuClock, choose,
};
pub use decoder::{DecodeLimits, DecodedPage, DecodedPages, Decoder};
pub use encoder::{
    Encoder, FrameStats, MAX_FRAME_INPUT, PageRef, max_chunk_frame_len, max_page_frame_len,
};
pub use error::{CodecError, DecodeError};
pub use frame::{ChunkDigest, SessionKey};
pub use page::{
    ContentHash, PAGE_SIZE, PageSize, count_zero_pages, fingerprint, is_zero, signature,
};

/// Default bytes of state (recent page contents) kept on each side: 64 MiB.
pub const DEFAULT_STATE_LIMIT: usize = 64 << 20;

/// What both ends of a session must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecConfig {
    /// Page size of page frames.
    pub page_size: PageSize,
    /// Bytes of recent page contents each side keeps for references and
    /// deltas (0 disables both, except baseline references). Enforced: the
    /// state never holds more (plus the one frame being decoded when a frame
    /// is larger than the limit).
    pub state_limit: usize,
    /// Session key: when set, checksums are keyed BLAKE3 and unkeyed frames
    /// are refused.
    pub key: Option<SessionKey>,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            page_size: PageSize::DEFAULT,
            state_limit: DEFAULT_STATE_LIMIT,
            key: None,
        }
    }
}
