//! The sender's chunk scheduler, sans-IO: which stream carries which chunk,
//! per-stream credit, acknowledgement, and what goes out again when a
//! stream fails.
//!
//! Each stream has a window of credit (chunk bytes not yet acknowledged).
//! A chunk is given to the live stream with the most free credit that can
//! take it whole, so a slow stream, whose acknowledgements come back late,
//! gets fewer chunks. When a stream fails, every chunk it held and that was
//! not acknowledged goes back to the front of the queue, in chunk order, and
//! is given to the others; chunks are cut lazily from region cursors, so
//! memory stays bounded by the windows whatever the transfer's size.

use std::collections::{BTreeMap, VecDeque};

use crate::wire::Addressing;

/// One chunk to send: where its bytes come from and go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Session-wide id.
    pub id: u64,
    /// The region.
    pub region: u32,
    /// Region or ordered.
    pub addressing: Addressing,
    /// Byte offset (region) or sequence number (ordered).
    pub offset: u64,
    /// Bytes.
    pub len: u32,
    /// The bytes themselves when the source cannot be read again (ordered
    /// byte streams); `None` when they are read from the region's source.
    pub data: Option<std::sync::Arc<[u8]>>,
}

/// A region still being cut into chunks.
#[derive(Debug)]
struct Cursor {
    region: u32,
    next: u64,
    len: u64,
    chunk: u64,
}

#[derive(Debug, Default)]
struct Stream {
    up: bool,
    /// Assigned, not yet taken for sending.
    queued: VecDeque<Chunk>,
    /// Taken or queued and not acknowledged, by id.
    unacked: BTreeMap<u64, Chunk>,
    /// Bytes of `unacked`.
    used: u64,
    /// Ids in `unacked` that were actually handed out for sending, with the
    /// bytes they took on the wire (0 until [`Scheduler::on_wire`]).
    sent: BTreeMap<u64, u64>,
}

/// What [`Scheduler::fail`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requeued {
    /// Chunks put back.
    pub chunks: u64,
    /// Of them, bytes that had been sent on the failed stream (they go out
    /// again: retransmission).
    pub resent_bytes: u64,
}

/// The scheduler of one session.
#[derive(Debug)]
pub struct Scheduler {
    window: u64,
    streams: Vec<Stream>,
    /// Chunks waiting for credit, retransmissions first.
    pending: VecDeque<Chunk>,
    cursors: VecDeque<Cursor>,
    next_id: u64,
    /// Chunks per region not yet acknowledged.
    outstanding: BTreeMap<u32, u64>,
}

impl Scheduler {
    /// A scheduler for `streams` streams (all down) with `window` bytes of
    /// credit each.
    pub fn new(streams: usize, window: u64) -> Self {
        Scheduler {
            window: window.max(1),
            streams: (0..streams).map(|_| Stream::default()).collect(),
            pending: VecDeque::new(),
            cursors: VecDeque::new(),
            next_id: 0,
            outstanding: BTreeMap::new(),
        }
    }

    /// Number of stream slots.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// Adds a stream slot (down); returns its index.
    pub fn add_stream(&mut self) -> usize {
        self.streams.push(Stream::default());
        self.streams.len() - 1
    }

    /// Streams up now.
    pub fn live(&self) -> usize {
        self.streams.iter().filter(|s| s.up).count()
    }

    /// Whether stream `s` is up.
    pub fn is_up(&self, s: usize) -> bool {
        self.streams.get(s).is_some_and(|x| x.up)
    }

    /// Cuts region `region` of `len` bytes into chunks of `chunk` bytes,
    /// lazily. A zero-length region has no chunks.
    pub fn add_region(&mut self, region: u32, len: u64, chunk: u32) {
        if len > 0 {
            self.cursors.push_back(Cursor {
                region,
                next: 0,
                len,
                chunk: u64::from(chunk.max(1)),
            });
        }
        self.outstanding.entry(region).or_insert(0);
        self.assign();
    }

    /// Queues one chunk whose bytes travel with it (ordered streams);
    /// returns its id.
    pub fn add_chunk(&mut self, region: u32, seq: u64, data: std::sync::Arc<[u8]>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        *self.outstanding.entry(region).or_insert(0) += 1;
        self.pending.push_back(Chunk {
            id,
            region,
            addressing: Addressing::Ordered,
            offset: seq,
            len: data.len() as u32,
            data: Some(data),
        });
        self.assign();
        id
    }

    /// Chunks of `region` cut so far and not acknowledged, and whether it
    /// still has bytes to cut.
    pub fn region_outstanding(&self, region: u32) -> (u64, bool) {
        (
            self.outstanding.get(&region).copied().unwrap_or(0),
            self.cursors.iter().any(|c| c.region == region),
        )
    }

    /// Bytes queued or in flight that carry their own data (what
    /// [`Scheduler::add_chunk`] holds in memory).
    pub fn owned_bytes(&self) -> u64 {
        let pend: u64 = self
            .pending
            .iter()
            .filter(|c| c.data.is_some())
            .map(|c| u64::from(c.len))
            .sum();
        let held: u64 = self
            .streams
            .iter()
            .flat_map(|s| s.unacked.values())
            .filter(|c| c.data.is_some())
            .map(|c| u64::from(c.len))
            .sum();
        pend + held
    }

    /// Whether nothing is left to send or acknowledge.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.cursors.is_empty()
            && self.streams.iter().all(|s| s.unacked.is_empty())
    }

    /// Stream `s` is up (joined).
    pub fn up(&mut self, s: usize) {
        if let Some(x) = self.streams.get_mut(s) {
            x.up = true;
        }
        self.assign();
    }

    /// The next chunk stream `s` should send, if it has one.
    pub fn next(&mut self, s: usize) -> Option<Chunk> {
        let st = self.streams.get_mut(s)?;
        let c = st.queued.pop_front()?;
        st.sent.insert(c.id, 0);
        Some(c)
    }

    /// Chunk `id`, handed to stream `s`, takes `bytes` on the wire (frame
    /// and headers); [`Scheduler::ack_wire`] gives it back.
    pub fn on_wire(&mut self, s: usize, id: u64, bytes: u64) {
        if let Some(b) = self.streams.get_mut(s).and_then(|st| st.sent.get_mut(&id)) {
            *b = bytes;
        }
    }

    /// Stream `s` received an acknowledgement of chunk `id`. Returns the
    /// chunk when it was outstanding on that stream (a repeated or unknown
    /// id is ignored).
    pub fn ack(&mut self, s: usize, id: u64) -> Option<Chunk> {
        self.ack_wire(s, id).map(|(c, _)| c)
    }

    /// [`Scheduler::ack`], with the bytes the chunk took on the wire (as
    /// told by [`Scheduler::on_wire`]; 0 if never told).
    pub fn ack_wire(&mut self, s: usize, id: u64) -> Option<(Chunk, u64)> {
        let st = self.streams.get_mut(s)?;
        let c = st.unacked.remove(&id)?;
        let wire = st.sent.remove(&id).unwrap_or(0);
        st.queued.retain(|q| q.id != id);
        st.used -= u64::from(c.len);
        if let Some(n) = self.outstanding.get_mut(&c.region) {
            *n = n.saturating_sub(1);
        }
        self.assign();
        Some((c, wire))
    }

    /// Stream `s` failed: everything it held goes back to the front of the
    /// queue, in id order, for the other streams.
    pub fn fail(&mut self, s: usize) -> Requeued {
        let Some(st) = self.streams.get_mut(s) else {
            return Requeued::default();
        };
        st.up = false;
        st.queued.clear();
        st.used = 0;
        let sent = std::mem::take(&mut st.sent);
        let back = std::mem::take(&mut st.unacked);
        let mut r = Requeued::default();
        for c in back.into_values().rev() {
            r.chunks += 1;
            if sent.contains_key(&c.id) {
                r.resent_bytes += u64::from(c.len);
            }
            self.pending.push_front(c);
        }
        self.assign();
        r
    }

    /// Free credit of stream `s`.
    pub fn free(&self, s: usize) -> u64 {
        self.streams
            .get(s)
            .map_or(0, |x| self.window.saturating_sub(x.used))
    }

    /// The live stream with the most free credit that can take `len` bytes
    /// (a chunk larger than a whole window goes to an idle stream).
    fn pick(&self, len: u64) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for (i, st) in self.streams.iter().enumerate() {
            if !st.up {
                continue;
            }
            let free = self.window.saturating_sub(st.used);
            let fits = free >= len || st.used == 0;
            if fits && best.is_none_or(|(_, f)| free > f) {
                best = Some((i, free));
            }
        }
        best.map(|(i, _)| i)
    }

    fn next_pending(&mut self) -> Option<Chunk> {
        if let Some(c) = self.pending.pop_front() {
            return Some(c);
        }
        let cur = self.cursors.front_mut()?;
        let len = cur.chunk.min(cur.len - cur.next);
        let c = Chunk {
            id: self.next_id,
            region: cur.region,
            addressing: Addressing::Region,
            offset: cur.next,
            len: len as u32,
            data: None,
        };
        self.next_id += 1;
        *self.outstanding.entry(cur.region).or_insert(0) += 1;
        cur.next += len;
        if cur.next >= cur.len {
            self.cursors.pop_front();
        }
        Some(c)
    }

    fn peek_len(&self) -> Option<u64> {
        if let Some(c) = self.pending.front() {
            return Some(u64::from(c.len));
        }
        self.cursors.front().map(|c| c.chunk.min(c.len - c.next))
    }

    /// Gives waiting chunks to streams while credit lasts.
    fn assign(&mut self) {
        while let Some(len) = self.peek_len() {
            let Some(s) = self.pick(len) else { break };
            let Some(c) = self.next_pending() else { break };
            let st = &mut self.streams[s];
            st.used += u64::from(c.len);
            st.unacked.insert(c.id, c.clone());
            st.queued.push_back(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut Scheduler, stream: usize) -> Vec<Chunk> {
        std::iter::from_fn(|| s.next(stream)).collect()
    }

    #[test]
    fn chunks_go_to_the_stream_with_most_credit() {
        let mut s = Scheduler::new(2, 4);
        s.up(0);
        s.up(1);
        s.add_region(7, 10, 1);
        // 10 chunks of 1 byte, windows of 4: 8 assigned, alternating.
        let a = drain(&mut s, 0);
        let b = drain(&mut s, 1);
        assert_eq!((a.len(), b.len()), (4, 4));
        assert_eq!(a[0].offset, 0);
        assert_eq!(b[0].offset, 1);
        // Stream 1 acknowledges quickly: it gets the rest.
        s.ack(1, b[0].id).unwrap();
        s.ack(1, b[1].id).unwrap();
        let more = drain(&mut s, 1);
        assert_eq!(more.len(), 2);
        assert!(drain(&mut s, 0).is_empty());
        assert_eq!(s.region_outstanding(7), (8, false));
    }

    #[test]
    fn a_failed_stream_hands_its_unacked_chunks_to_the_others_once() {
        let mut s = Scheduler::new(3, 1 << 20);
        for i in 0..3 {
            s.up(i);
        }
        s.add_region(1, 9 << 10, 1 << 10);
        let held: Vec<Vec<Chunk>> = (0..3).map(|i| drain(&mut s, i)).collect();
        assert_eq!(held.iter().map(Vec::len).sum::<usize>(), 9);
        // Stream 0 gets one acknowledged, then fails.
        s.ack(0, held[0][0].id).unwrap();
        let r = s.fail(0);
        assert_eq!(r.chunks, held[0].len() as u64 - 1);
        assert_eq!(r.resent_bytes, r.chunks << 10);
        let again: Vec<u64> = (1..3)
            .flat_map(|i| drain(&mut s, i))
            .map(|c| c.id)
            .collect();
        let want: Vec<u64> = held[0][1..].iter().map(|c| c.id).collect();
        let mut got = again.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        // Late acknowledgement from the failed stream is ignored.
        assert!(s.ack(0, held[0][1].id).is_none());
        for (i, chunks) in held.iter().enumerate().skip(1) {
            for c in chunks {
                s.ack(i, c.id).unwrap();
            }
        }
        assert!(!s.idle());
        for id in again {
            let on = (1..3).find(|&i| s.ack(i, id).is_some());
            assert!(on.is_some());
        }
        assert!(s.idle());
        assert_eq!(s.region_outstanding(1), (0, false));
    }

    #[test]
    fn nothing_is_assigned_without_a_live_stream_and_memory_is_bounded() {
        let mut s = Scheduler::new(2, 4 << 20);
        s.add_region(1, 1 << 40, 1 << 20);
        assert!(s.next(0).is_none());
        s.up(0);
        // A terabyte region: only the window is cut.
        assert_eq!(drain(&mut s, 0).len(), 4);
        assert_eq!(s.region_outstanding(1), (4, true));
        let r = s.fail(0);
        assert_eq!(r.chunks, 4);
        assert!(s.next(1).is_none());
        s.up(1);
        let ids: Vec<u64> = drain(&mut s, 1).iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0, 1, 2, 3], "retransmissions first, in order");
    }

    #[test]
    fn ordered_chunks_carry_their_bytes() {
        let mut s = Scheduler::new(1, 8);
        s.up(0);
        let id = s.add_chunk(3, 0, std::sync::Arc::from(&b"abcdefgh"[..]));
        s.add_chunk(3, 1, std::sync::Arc::from(&b"ij"[..]));
        assert_eq!(s.owned_bytes(), 10);
        let c = s.next(0).unwrap();
        assert_eq!(c.id, id);
        assert_eq!(c.data.as_deref(), Some(&b"abcdefgh"[..]));
        assert!(s.next(0).is_none(), "the window is full");
        s.ack(0, id).unwrap();
        assert_eq!(s.next(0).unwrap().offset, 1);
    }

    #[test]
    fn acknowledgements_give_back_the_wire_bytes() {
        let mut s = Scheduler::new(2, 1 << 20);
        s.up(0);
        s.add_region(0, 3 << 16, 1 << 16);
        let a = s.next(0).unwrap();
        let b = s.next(0).unwrap();
        s.on_wire(0, a.id, 1000);
        s.on_wire(1, b.id, 7); // not on stream 1: ignored
        assert_eq!(
            s.ack_wire(0, a.id).map(|(c, w)| (c.id, w)),
            Some((a.id, 1000))
        );
        assert_eq!(s.ack_wire(0, b.id).map(|(_, w)| w), Some(0), "never told");
        assert!(s.ack_wire(0, a.id).is_none(), "acknowledged once");
    }
}
