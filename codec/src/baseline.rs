//! Baselines: pages a receiver already holds (say, the base image of a VM)
//! and the advertisement of them that it sends to the encoder.

use std::collections::HashMap;

use crate::page::{ContentHash, PageSize, fingerprint, is_zero};
use crate::store::FastMap;
use crate::{CodecError, DecodeError};

/// The receiver's side: page contents by BLAKE3-128 hash.
#[derive(Debug)]
pub struct Baseline {
    page_size: PageSize,
    data: Vec<u8>,
    by_hash: HashMap<ContentHash, usize>,
    fps: Vec<u64>,
}

impl Baseline {
    /// An empty baseline.
    pub fn new(page_size: PageSize) -> Baseline {
        Baseline {
            page_size,
            data: Vec::new(),
            by_hash: HashMap::new(),
            fps: Vec::new(),
        }
    }

    /// A baseline of every distinct non-zero page of `image`.
    pub fn from_image(page_size: PageSize, image: &[u8]) -> Result<Baseline, CodecError> {
        let ps = page_size.bytes();
        if !image.len().is_multiple_of(ps) {
            return Err(CodecError::InvalidInput(format!(
                "image of {} bytes is not a whole number of {ps}-byte pages",
                image.len()
            )));
        }
        let mut b = Baseline::new(page_size);
        for p in image.chunks_exact(ps) {
            b.insert(p)?;
        }
        Ok(b)
    }

    /// Adds one page; zero pages (sent as tags anyway) and pages already
    /// held are skipped. Returns whether it was added.
    pub fn insert(&mut self, page: &[u8]) -> Result<bool, CodecError> {
        let ps = self.page_size.bytes();
        if page.len() != ps {
            return Err(CodecError::InvalidInput(format!(
                "baseline page of {} bytes, the page size is {ps}",
                page.len()
            )));
        }
        if is_zero(page) {
            return Ok(false);
        }
        let h = ContentHash::of(page);
        if self.by_hash.contains_key(&h) {
            return Ok(false);
        }
        self.by_hash.insert(h, self.data.len());
        self.data.extend_from_slice(page);
        self.fps.push(fingerprint(page));
        Ok(true)
    }

    /// The page with hash `h`.
    pub fn get(&self, h: &ContentHash) -> Option<&[u8]> {
        let at = *self.by_hash.get(h)?;
        self.data.get(at..at + self.page_size.bytes())
    }

    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The advertisement to send to the encoder.
    pub fn advertise(&self) -> BaselineAdvert {
        let mut a = BaselineAdvert::new(self.page_size);
        for (h, &at) in &self.by_hash {
            let fp = self.fps[at / self.page_size.bytes()];
            a.add(fp, *h);
        }
        a
    }
}

/// The encoder's side: which content the receiver holds, as (fingerprint,
/// hash) pairs. A page whose fingerprint is listed is hashed with BLAKE3 and
/// referenced only when the hash is listed too.
#[derive(Debug, Clone)]
pub struct BaselineAdvert {
    page_size: PageSize,
    by_fp: FastMap<u64, Vec<ContentHash>>,
    count: usize,
}

const ADVERT_MAGIC: [u8; 4] = *b"HDEb";
const ADVERT_VERSION: u8 = 1;
const ADVERT_HEADER: usize = 16;
const ADVERT_ENTRY: usize = 24;

impl BaselineAdvert {
    /// An empty advertisement.
    pub fn new(page_size: PageSize) -> BaselineAdvert {
        BaselineAdvert {
            page_size,
            by_fp: FastMap::default(),
            count: 0,
        }
    }

    /// Lists one page by its fingerprint and hash.
    pub fn add(&mut self, fp: u64, hash: ContentHash) {
        let v = self.by_fp.entry(fp).or_default();
        if !v.contains(&hash) {
            v.push(hash);
            self.count += 1;
        }
    }

    /// The hashes listed under fingerprint `fp`.
    pub fn candidates(&self, fp: u64) -> &[ContentHash] {
        self.by_fp.get(&fp).map_or(&[], |v| v.as_slice())
    }

    /// Number of pages listed.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it lists no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Serialises it: magic `HDEb`, version 1, page shift, 2 reserved zero
    /// bytes, entry count (u64 LE), then per entry the fingerprint (u64 LE)
    /// and the 16-byte hash, sorted by fingerprint then hash.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut entries: Vec<(u64, ContentHash)> = self
            .by_fp
            .iter()
            .flat_map(|(&fp, v)| v.iter().map(move |&h| (fp, h)))
            .collect();
        entries.sort_unstable();
        let mut out = Vec::with_capacity(ADVERT_HEADER + ADVERT_ENTRY * entries.len());
        out.extend_from_slice(&ADVERT_MAGIC);
        out.push(ADVERT_VERSION);
        out.push(self.page_size.shift());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (fp, h) in entries {
            out.extend_from_slice(&fp.to_le_bytes());
            out.extend_from_slice(&h.0);
        }
        out
    }

    /// Parses an advertisement of at most `max_entries` entries.
    pub fn from_bytes(bytes: &[u8], max_entries: u64) -> Result<BaselineAdvert, DecodeError> {
        let Some(head) = bytes.get(..ADVERT_HEADER) else {
            return Err(DecodeError::Truncated {
                what: "baseline advertisement",
                needed: ADVERT_HEADER as u64,
                available: bytes.len() as u64,
            });
        };
        if head[..4] != ADVERT_MAGIC {
            return Err(DecodeError::BadMagic {
                found: [head[0], head[1], head[2], head[3]],
            });
        }
        if head[4] != ADVERT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: head[4],
                min: ADVERT_VERSION,
                max: ADVERT_VERSION,
            });
        }
        let page_size = PageSize::from_shift(head[5]).ok_or(DecodeError::PageSizeMismatch {
            found: 1u64.checked_shl(u32::from(head[5])).unwrap_or(0),
            expected: 0,
        })?;
        if head[6] != 0 || head[7] != 0 {
            return Err(DecodeError::Reserved {
                field: "baseline advertisement header",
                value: u64::from(head[6]) | (u64::from(head[7]) << 8),
            });
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&head[8..16]);
        let count = u64::from_le_bytes(c);
        if count > max_entries {
            return Err(DecodeError::OverLimit {
                what: "baseline advertisement entries",
                value: count,
                limit: max_entries,
            });
        }
        let want = count
            .checked_mul(ADVERT_ENTRY as u64)
            .and_then(|n| n.checked_add(ADVERT_HEADER as u64))
            .ok_or(DecodeError::OverLimit {
                what: "baseline advertisement entries",
                value: count,
                limit: max_entries,
            })?;
        if (bytes.len() as u64) < want {
            return Err(DecodeError::Truncated {
                what: "baseline advertisement",
                needed: want,
                available: bytes.len() as u64,
            });
        }
        if bytes.len() as u64 > want {
            return Err(DecodeError::TrailingBytes {
                what: "baseline advertisement",
                extra: bytes.len() as u64 - want,
            });
        }
        let mut a = BaselineAdvert::new(page_size);
        for e in bytes[ADVERT_HEADER..].chunks_exact(ADVERT_ENTRY) {
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&e[..8]);
            let mut h = [0u8; 16];
            h.copy_from_slice(&e[8..]);
            a.add(u64::from_le_bytes(fp), ContentHash(h));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_round_trip_and_rejects_garbage() {
        let mut img = vec![0u8; 4096 * 4];
        img[5] = 1;
        img[4096 + 7] = 2;
        img.copy_within(..4096, 3 * 4096);
        let b = Baseline::from_image(PageSize::DEFAULT, &img).unwrap();
        assert_eq!(b.len(), 2);
        let a = b.advertise();
        let bytes = a.to_bytes();
        let back = BaselineAdvert::from_bytes(&bytes, 10).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.to_bytes(), bytes);
        assert!(BaselineAdvert::from_bytes(&bytes, 1).is_err());
        assert!(BaselineAdvert::from_bytes(&bytes[..bytes.len() - 1], 10).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(BaselineAdvert::from_bytes(&long, 10).is_err());
        let mut huge = bytes.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(BaselineAdvert::from_bytes(&huge, u64::MAX).is_err());
    }
}
