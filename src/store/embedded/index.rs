//! The embedded store's in-memory table of blocks: one fixed-size slot per
//! block id, compact enough for millions of live token families.
//!
//! Why not `HashMap<String, Entry>`: a revocation id is a 64-byte ed25519
//! signature, 128 hex characters. As a `String` key it costs a heap
//! allocation of 128 bytes plus the map's own slack, and the block metadata
//! (labels, parents, families as more hex strings) doubled that again:
//! about 1.1 KB per family. Here an id is kept as its 64 decoded bytes inside
//! the slot, the slots sit in one `Vec`, and a `hashbrown::HashTable<u32>`
//! of slot numbers finds them (5 bytes per bucket instead of a whole slot).
//! Block metadata stays on disk; only the fact that it was recorded (one
//! flag) and the per-family block count live here.
//!
//! The table hashes with foldhash, seeded at random per process: std's
//! SipHash of a 64-byte id cost 460 instructions, and every request looks
//! up each of its blocks (callgrind, benches/README.md). It hashes an id's
//! text, so a lookup neither decodes nor allocates: decoding the id first
//! cost 270 of a lookup's 430 instructions. Ids are signatures
//! made by token holders, not chosen freely, and the seed is secret.
//!
//! Ids that are not lower-case hex of at most 64 bytes (never produced by
//! Till's tokens, but accepted by the store API) are kept as text in a side
//! map, so every string maps to exactly one slot, as before.

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::quality::RandomState;

use hashbrown::HashTable;

/// Longest id kept inline, in bytes (an ed25519 signature).
const INLINE: usize = 64;

/// The slot holds a block (free slots have no flag).
pub const OCCUPIED: u8 = 1;
/// The block has a counter (a reservation was made, or one was on disk).
pub const COUNTER: u8 = 2;
/// The block's metadata is recorded (on disk, or queued for the writer).
pub const META: u8 = 4;
/// `limit` holds the block's own use limit.
pub const HAS_LIMIT: u8 = 8;

/// One block. 112 bytes.
#[derive(Clone, Debug)]
pub struct Slot {
    /// Decoded id when `id_len > 0`; otherwise the id is in `Index::text`.
    id: [u8; INLINE],
    id_len: u8,
    pub flags: u8,
    /// Unix seconds of the last reservation this process saw, 0 for none
    /// (seconds fit 32 bits until 2106).
    pub last_use: u32,
    /// Blocks of the family this block is the authority of, when it is one
    /// (`limits.max_blocks_per_family`). A family whose authority block has
    /// no counter still gets a slot to hold this number.
    pub family_blocks: u32,
    /// Exact uses granted (minus rollbacks) since the counter was created.
    pub count: u64,
    /// Value known to be on disk (a mark asked of the writer and not yet
    /// committed is kept beside the slots).
    pub durable: u64,
    /// Meaningful with [`HAS_LIMIT`].
    pub limit: u64,
    /// Unix seconds, 0 for none.
    pub expires: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            id: [0; INLINE],
            id_len: 0,
            flags: 0,
            last_use: 0,
            family_blocks: 0,
            count: 0,
            durable: 0,
            limit: 0,
            expires: 0,
        }
    }
}

impl Slot {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn limit(&self) -> Option<u64> {
        self.has(HAS_LIMIT).then_some(self.limit)
    }

    pub fn set_limit(&mut self, limit: Option<u64>) {
        match limit {
            Some(l) => {
                self.limit = l;
                self.flags |= HAS_LIMIT;
            }
            None => {
                self.limit = 0;
                self.flags &= !HAS_LIMIT;
            }
        }
    }

    /// Forgets the counter and the metadata flag, keeping the id and the
    /// family's block count.
    pub fn clear(&mut self) {
        *self = Slot {
            id: self.id,
            id_len: self.id_len,
            flags: OCCUPIED,
            family_blocks: self.family_blocks,
            ..Slot::default()
        };
    }

    pub fn last_use(&self) -> Option<u64> {
        (self.last_use != 0).then_some(u64::from(self.last_use))
    }

    pub fn set_last_use(&mut self, now: u64) {
        self.last_use = u32::try_from(now).unwrap_or(u32::MAX);
    }
}

/// How an id is stored: its decoded bytes, or its text.
enum Key<'a> {
    Bin([u8; INLINE], usize),
    Text(&'a str),
}

/// Decodes by hand, in two passes the compiler vectorises: it runs for
/// every block a reopen loads (the `hex` crate's decoder was a third of a
/// reopen's CPU time, perf, 200 000 families) and every block added;
/// lookups compare text instead ([`matches`]). Only lower-case
/// digits may be stored as bytes (the `hex` crate also takes upper case,
/// and `AB` and `ab` are different ids to the store).
fn key(id: &str) -> Key<'_> {
    let b = id.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(2) || b.len() > 2 * INLINE {
        return Key::Text(id);
    }
    // Each character's value, and whether any was not a lower-case digit:
    // no branch, no table, so a whole vector of characters at a time.
    let mut nibbles = [0u8; 2 * INLINE];
    let mut bad = 0u8;
    for (n, &c) in nibbles.iter_mut().zip(b) {
        let digit = c.wrapping_sub(b'0');
        let letter = c.wrapping_sub(b'a');
        let (is_digit, is_letter) = (digit < 10, letter < 6);
        *n = if is_digit {
            digit
        } else {
            letter.wrapping_add(10)
        };
        bad |= u8::from(!(is_digit | is_letter));
    }
    if bad != 0 {
        return Key::Text(id);
    }
    // Each pair read as one little-endian u16 (low byte the high nibble):
    // shifts in 16-bit lanes, which vectorise, where `pair[0] << 4 | pair[1]`
    // over `chunks_exact(2)` ran a byte at a time (204 of a lookup's 760
    // instructions, callgrind; 600 → 270 per decode with this pass).
    let mut out = [0u8; INLINE];
    let (pairs, _) = nibbles.as_chunks::<2>();
    for (o, pair) in out.iter_mut().zip(pairs) {
        let v = u16::from_le_bytes(*pair);
        *o = ((v << 4) | (v >> 8)) as u8;
    }
    Key::Bin(out, b.len() / 2)
}

/// Blocks by id. Slot numbers are stable while a block is present; a
/// removed block's slot is reused, so hold ids, not slot numbers, across
/// a release of the store's lock.
pub struct Index {
    slots: Vec<Slot>,
    table: HashTable<u32>,
    text: HashMap<u32, Box<str>>,
    free: Vec<u32>,
    hasher: RandomState,
}

/// An id is hashed as the text its callers spell (a slot holding decoded
/// bytes is hashed as their lower-case hex, which is that text): a lookup
/// hashes the text it was given and never decodes it, which is the cost
/// that counts, every block of every request, twice. Encoding a slot back
/// happens only when the table grows.
fn hash_text(h: &RandomState, id: &[u8]) -> u64 {
    h.hash_one(id)
}

/// The two lower-case hex digits of `v`, as the little-endian `u16` of
/// their bytes (the high digit first in memory). Arithmetic in one 16-bit
/// lane, no branch and no table, so loops over it vectorise: a nibble `k`
/// becomes `'0' + k`, plus `'a' - '0' - 10` when `k + 6` carries into bit 4.
fn hex_pair(v: u8) -> u16 {
    let v = u16::from(v);
    let nibbles = (v >> 4) | ((v & 15) << 8);
    let letters = ((nibbles + 0x0606) >> 4) & 0x0101;
    nibbles + 0x3030 + letters * u16::from(b'a' - b'0' - 10)
}

/// The lower-case hex of a slot's whole id array. A fixed trip count, so
/// the compiler vectorises it (over a slice of the id's own length it ran a
/// byte at a time: 200 instructions a lookup, callgrind); the caller takes
/// the first `2 * id_len` bytes.
fn encode(id: &[u8; INLINE]) -> [u8; 2 * INLINE] {
    let mut out = [0u8; 2 * INLINE];
    for (pair, &v) in out.as_chunks_mut::<2>().0.iter_mut().zip(id) {
        *pair = hex_pair(v).to_le_bytes();
    }
    out
}

fn hash_slot(h: &RandomState, slots: &[Slot], text: &HashMap<u32, Box<str>>, i: u32) -> u64 {
    let s = &slots[i as usize];
    if s.id_len > 0 {
        hash_text(h, &encode(&s.id)[..2 * usize::from(s.id_len)])
    } else {
        let t = text.get(&i).map_or(&[][..], |t| t.as_bytes());
        hash_text(h, t)
    }
}

/// Whether slot `i` holds the block spelled `id`. A slot of bytes is
/// compared by its hex: only lower-case hex text is ever stored as bytes,
/// and only such text can equal that hex, so every string still names
/// exactly one slot.
fn matches(slots: &[Slot], text: &HashMap<u32, Box<str>>, i: u32, id: &str) -> bool {
    let s = &slots[i as usize];
    let n = usize::from(s.id_len);
    if n > 0 {
        id.len() == 2 * n && encode(&s.id)[..2 * n] == *id.as_bytes()
    } else {
        text.get(&i).is_some_and(|x| &**x == id)
    }
}

impl Default for Index {
    fn default() -> Self {
        Index {
            slots: Vec::new(),
            table: HashTable::new(),
            text: HashMap::new(),
            free: Vec::new(),
            hasher: RandomState::default(),
        }
    }
}

impl Index {
    /// The slot of `id`, if present.
    pub fn find(&self, id: &str) -> Option<u32> {
        let h = hash_text(&self.hasher, id.as_bytes());
        self.table
            .find(h, |&i| matches(&self.slots, &self.text, i, id))
            .copied()
    }

    pub fn get(&self, id: &str) -> Option<&Slot> {
        self.find(id).map(|i| &self.slots[i as usize])
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Slot> {
        self.find(id).map(|i| &mut self.slots[i as usize])
    }

    pub fn slot(&self, i: u32) -> &Slot {
        &self.slots[i as usize]
    }

    pub fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.slots[i as usize]
    }

    /// The slot of `id`, created empty (only [`OCCUPIED`]) if absent.
    pub fn find_or_insert(&mut self, id: &str) -> u32 {
        let h = hash_text(&self.hasher, id.as_bytes());
        if let Some(&i) = self
            .table
            .find(h, |&i| matches(&self.slots, &self.text, i, id))
        {
            return i;
        }
        let k = key(id);
        let mut slot = Slot {
            flags: OCCUPIED,
            ..Slot::default()
        };
        if let Key::Bin(b, n) = &k {
            slot.id = *b;
            // n ≤ INLINE = 64 by construction.
            slot.id_len = *n as u8;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 4 billion blocks")
            }
        };
        if let Key::Text(t) = k {
            self.text.insert(i, t.into());
        }
        let (slots, text, hasher) = (&self.slots, &self.text, &self.hasher);
        self.table
            .insert_unique(h, i, |&j| hash_slot(hasher, slots, text, j));
        i
    }

    /// Forgets the block of `id`; its slot will be reused.
    pub fn remove(&mut self, id: &str) {
        let h = hash_text(&self.hasher, id.as_bytes());
        let (slots, text) = (&self.slots, &self.text);
        if let Ok(e) = self.table.find_entry(h, |&i| matches(slots, text, i, id)) {
            let (i, _) = e.remove();
            self.slots[i as usize] = Slot::default();
            self.text.remove(&i);
            self.free.push(i);
        }
    }

    /// The id of slot `i`, as the store's callers spell it.
    pub fn id(&self, i: u32) -> String {
        let s = &self.slots[i as usize];
        if s.id_len > 0 {
            hex::encode(&s.id[..usize::from(s.id_len)])
        } else {
            self.text.get(&i).map(|t| t.to_string()).unwrap_or_default()
        }
    }

    /// Every present block, with its slot number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.has(OCCUPIED))
            .map(|(i, s)| (i as u32, s))
    }

    /// Room for `n` more blocks without growing (the opening scan).
    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve(n);
        let (slots, text, hasher) = (&self.slots, &self.text, &self.hasher);
        self.table
            .reserve(n, |&j| hash_slot(hasher, slots, text, j));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_case_hex_is_decoded_and_it_decodes_right() {
        for hi in 0..=255u8 {
            for lo in 0..=255u8 {
                let pair = [hi, lo];
                let Ok(id) = std::str::from_utf8(&pair) else {
                    continue;
                };
                let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
                let want = pair
                    .iter()
                    .all(|&c| lower_hex(c))
                    .then(|| u8::from_str_radix(id, 16).unwrap());
                match (key(id), want) {
                    (Key::Bin(b, 1), Some(v)) => assert_eq!(b[0], v, "{id:?}"),
                    (Key::Text(_), None) => {}
                    (Key::Bin(..), None) => panic!("{id:?} taken as hex"),
                    (_, Some(_)) => panic!("{id:?} not taken as hex"),
                }
            }
        }
        let id: String = (0..64u8)
            .map(|k| format!("{:02x}", k.wrapping_mul(37)))
            .collect();
        let Key::Bin(b, 64) = key(&id) else {
            panic!("a 128-digit id is bytes")
        };
        assert!((0..64u8).all(|k| b[usize::from(k)] == k.wrapping_mul(37)));
        // Every byte value at every position of ids of every length.
        for len in 1..=INLINE {
            for shift in 0..=255u8 {
                let want: Vec<u8> = (0..len as u8).map(|k| k.wrapping_add(shift)).collect();
                let Key::Bin(b, n) = key(&hex::encode(&want)) else {
                    panic!("{len} bytes of hex are bytes")
                };
                assert_eq!((&b[..n], n), (&want[..], len));
                assert!(b[n..].iter().all(|&x| x == 0));
            }
        }
    }

    #[test]
    fn encode_is_lower_case_hex() {
        for start in (0..=255u8).step_by(INLINE) {
            let mut id = [0u8; INLINE];
            for (k, b) in id.iter_mut().enumerate() {
                *b = start.wrapping_add(k as u8);
            }
            assert_eq!(encode(&id), *hex::encode(id).as_bytes());
        }
    }

    /// The table rehashes slots from their stored form while it grows:
    /// every id, bytes or text, must still be found by its spelling, and
    /// near misses (upper case, one digit off, a prefix) by none.
    #[test]
    fn ids_are_found_by_their_spelling_after_the_table_grows() {
        let mut ix = Index::default();
        let ids: Vec<String> = (0..5000u32)
            .map(|k| match k % 4 {
                0 => hex::encode(
                    (0..INLINE as u32)
                        .map(|j| (k.wrapping_mul(2_654_435_761) >> (j % 24)) as u8 ^ j as u8)
                        .collect::<Vec<u8>>(),
                ),
                1 => hex::encode(k.to_be_bytes()),
                2 => format!("label-{k}"),
                _ => hex::encode(k.to_be_bytes()).to_uppercase() + "Z",
            })
            .collect();
        let slots: Vec<u32> = ids.iter().map(|id| ix.find_or_insert(id)).collect();
        for (id, &i) in ids.iter().zip(&slots) {
            assert_eq!(ix.find(id), Some(i), "{id}");
            assert_eq!(ix.id(i), *id);
            if id.bytes().any(|b| b.is_ascii_lowercase()) && !id.starts_with("label") {
                assert_eq!(ix.find(&id.to_uppercase()), None, "{id}");
            }
            assert_ne!(ix.find(&id[..id.len() - 2]), Some(i), "{id}");
            let mut off = id.clone().into_bytes();
            off[0] = if off[0] == b'0' { b'1' } else { b'0' };
            assert_ne!(ix.find(std::str::from_utf8(&off).unwrap()), Some(i), "{id}");
        }
    }

    #[test]
    fn a_slot_is_112_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 112);
    }

    #[test]
    fn every_spelling_is_its_own_block_and_slots_are_reused() {
        let mut ix = Index::default();
        let hex_id = "0123456789abcdef".repeat(8);
        let ids = [
            hex_id.as_str(),
            "fedcba9876543210",
            "0g",   // not hex
            "AB",   // upper case: text, distinct from "ab"
            "ab",   // hex, one byte
            "abc",  // odd length: text
            "root", // not hex
            "00",
        ];
        let slots: Vec<u32> = ids.iter().map(|id| ix.find_or_insert(id)).collect();
        for (id, &i) in ids.iter().zip(&slots) {
            assert_eq!(ix.find(id), Some(i), "{id}");
            assert_eq!(ix.id(i), *id);
        }
        let too_long = "cd".repeat(65);
        let j = ix.find_or_insert(&too_long);
        assert_eq!(ix.id(j), too_long);
        assert_eq!(ix.find("ef"), None);
        let root = slots[ids.iter().position(|id| *id == "root").unwrap()];
        ix.slot_mut(root).count = 7;
        ix.remove("root");
        assert_eq!(ix.find("root"), None);
        let k = ix.find_or_insert("fresh");
        assert_eq!(k, root, "the freed slot is reused");
        assert_eq!(ix.slot(k).count, 0, "and starts empty");
        assert_eq!(ix.iter().count(), ids.len() + 1);
    }
}
