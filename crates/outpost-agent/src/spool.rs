//! The durable spool: a segmented, append-only log of checksummed entries, one directory per
//! stream, with one read cursor per consumer (sink). Generic over what it carries (a kind byte
//! and opaque bytes per entry), so pipeline records today and node events, alert transitions and
//! forwarded error lines later can share one mechanism.
//!
//! ## On disk
//! ```text
//! <dir>/id                       random hex, created once: with a seq it makes an id never reused
//! <dir>/<first seq, 20 digits>.seg
//!     "OPSPOOL1"                 8-byte magic
//!     entry*                     u32 LE body length | u32 LE crc32(body) | body
//!     body = u64 LE seq | i64 LE at (unix ms) | u8 kind | payload
//! <dir>/cursor-<consumer>        decimal seq: every entry up to it is delivered
//! ```
//! Sequence numbers grow by one per entry across segments; a segment's name is the seq of its
//! first entry. Only the newest segment is ever written.
//!
//! ## Crash invariants (what survives a `kill -9` or a power cut at any instant)
//! - An entry is durable once [`Spool::sync`] returned: callers acknowledge publishers only
//!   after that (group commit: one `fdatasync` for every entry written since the last).
//! - A torn or corrupt entry is detected by its length or checksum. [`Spool::open`] never
//!   appends after one: every start begins a new segment, so a torn tail stays where it is and
//!   readers skip from it to the end of its segment, count the bytes skipped, and go on with
//!   the next segment. Nothing loops, and no entry is read twice by one reader.
//! - Sequence numbers are never reused: a new segment starts after the last valid entry, or,
//!   when the newest segment is damaged, after every seq its bytes could have held.
//! - Cursors are written without fsync (write-temp, rename): a lost cursor only means entries
//!   are delivered again, and sinks store each entry id once.
//! - Segments are deleted only when every consumer's cursor is past them, or by the budget
//!   policy, which counts what it dropped.
//!
//! Memory stays bounded however large the backlog: opening reads only the newest segments, and
//! readers stream one entry at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"OPSPOOL1";
/// Entry header: length and checksum.
const HEADER: usize = 8;
/// seq, at, kind.
const BODY_FIXED: usize = 17;
/// Entries larger than this are refused (and read as corrupt).
pub const MAX_ENTRY: usize = 16 << 20;

/// One entry as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub at: i64,
    pub kind: u8,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {source}")]
    Io { dir: String, source: io::Error },
    #[error("entry of {0} bytes is larger than the spool's limit of {MAX_ENTRY}")]
    TooLarge(usize),
}

fn io_err(dir: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

/// What [`Spool::open`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// Bytes of the newest segment that did not read as valid entries (a torn tail).
    pub skipped_bytes: u64,
    pub segments: usize,
    pub bytes: u64,
}

/// Segment file name for a first seq.
fn seg_name(base: u64) -> String {
    format!("{base:020}.seg")
}

/// Segments of a directory, oldest first: (first seq, path, size).
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.push((base, e.path(), len));
    }
    out.sort_by_key(|s| s.0);
    Ok(out)
}

fn encode(buf: &mut Vec<u8>, seq: u64, at: i64, kind: u8, payload: &[u8]) {
    let len = (BODY_FIXED + payload.len()) as u32;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&at.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + HEADER..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the entries of one segment file in order.
pub struct SegmentReader {
    r: BufReader<File>,
    pos: u64,
    len: u64,
}

/// One step of a [`SegmentReader`].
#[derive(Debug, PartialEq)]
pub enum Read1 {
    Entry(Entry),
    /// The end of the valid entries (or of the file as written so far).
    End,
    /// A damaged entry at this offset; the rest of the segment (this many bytes) is skipped.
    Corrupt {
        offset: u64,
        skipped: u64,
    },
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut r = BufReader::with_capacity(64 << 10, f);
        let mut magic = [0u8; 8];
        let pos = match r.read_exact(&mut magic) {
            Ok(()) if &magic == MAGIC => 8,
            // A segment whose header was never fully written holds nothing.
            _ => len,
        };
        Ok(Self { r, pos, len })
    }

    /// Re-read the file length (the writer may have appended since).
    pub fn refresh(&mut self) {
        if let Ok(m) = self.r.get_ref().metadata() {
            self.len = m.len();
        }
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn next_entry(&mut self) -> Read1 {
        if self.pos + HEADER as u64 > self.len {
            return if self.pos == self.len {
                Read1::End
            } else {
                self.corrupt()
            };
        }
        let mut h = [0u8; HEADER];
        if self.r.read_exact(&mut h).is_err() {
            return self.corrupt();
        }
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        if !(BODY_FIXED..=MAX_ENTRY).contains(&len) || self.pos + (HEADER + len) as u64 > self.len {
            return self.corrupt();
        }
        let mut body = vec![0u8; len];
        if self.r.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
            return self.corrupt();
        }
        self.pos += (HEADER + len) as u64;
        Read1::Entry(Entry {
            seq: u64::from_le_bytes(body[0..8].try_into().expect("8 bytes")),
            at: i64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
            kind: body[16],
            payload: body[BODY_FIXED..].to_vec(),
        })
    }

    fn corrupt(&mut self) -> Read1 {
        let offset = self.pos;
        let skipped = self.len.saturating_sub(self.pos);
        self.pos = self.len;
        let _ = self.r.seek(SeekFrom::Start(self.len));
        Read1::Corrupt { offset, skipped }
    }
}

/// The writer side of one spool directory. One writer per directory.
pub struct Spool {
    dir: PathBuf,
    id: String,
    active: File,
    active_base: u64,
    active_len: u64,
    next_seq: u64,
    /// Sealed segments: (first seq, size).
    sealed: Vec<(u64, u64)>,
    segment_bytes: u64,
    /// Encoded entries not yet written to the file (written by `sync`, or when large).
    buf: Vec<u8>,
    dirty: bool,
}

/// Entries are buffered up to this many bytes before a write.
const WRITE_BUF: usize = 1 << 20;

impl Spool {
    /// Open (or create) the spool in `dir` and start a new segment. Reads only the newest
    /// segment, to find where the sequence goes on.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Spool, Recovery), SpoolError> {
        let e = io_err(dir);
        fs::create_dir_all(dir).map_err(e)?;
        let id_path = dir.join("id");
        let id = match fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                let id = hex::encode(rand::random::<[u8; 6]>());
                write_atomic(&id_path, id.as_bytes(), true).map_err(io_err(dir))?;
                id
            }
        };
        let segs = segments(dir).map_err(io_err(dir))?;
        let mut rec = Recovery::default();
        let mut next_seq = 1;
        let mut sealed = Vec::new();
        for (base, _, len) in &segs {
            sealed.push((*base, *len));
            rec.bytes += len;
        }
        // Drop segments that hold nothing at all (e.g. created just before a crash).
        if let Some((base, path, len)) = segs.last() {
            let mut r = SegmentReader::open(path).map_err(io_err(dir))?;
            let mut last = None;
            loop {
                match r.next_entry() {
                    Read1::Entry(en) => last = Some(en.seq),
                    Read1::End => break,
                    Read1::Corrupt { skipped, .. } => {
                        rec.skipped_bytes = skipped;
                        break;
                    }
                }
            }
            next_seq = match (last, rec.skipped_bytes) {
                (Some(s), 0) => s + 1,
                // Damaged: the lost entries may have had any seq up to one per byte.
                (l, _) => (l.map_or(*base, |s| s + 1)).max(base + len),
            };
            next_seq = next_seq.max(*base);
            if last.is_none() && rec.skipped_bytes == 0 {
                let _ = fs::remove_file(path);
                sealed.pop();
                rec.bytes -= len;
            }
        }
        rec.segments = sealed.len();
        let (active, active_len) = Self::create_segment(dir, next_seq)?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            id,
            active,
            active_base: next_seq,
            active_len,
            next_seq,
            sealed,
            segment_bytes: segment_bytes.max(4096),
            buf: Vec::with_capacity(64 << 10),
            dirty: false,
        };
        Ok((spool, rec))
    }

    fn create_segment(dir: &Path, base: u64) -> Result<(File, u64), SpoolError> {
        let path = dir.join(seg_name(base));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err(dir))?;
        f.write_all(MAGIC).map_err(io_err(dir))?;
        // The new file's name must survive a power cut before entries are acknowledged in it.
        f.sync_data().map_err(io_err(dir))?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((f, MAGIC.len() as u64))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Random id of this spool directory; `<id>-<seq>` never repeats.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The seq the next entry gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest segment's first seq.
    pub fn active_base(&self) -> u64 {
        self.active_base
    }

    /// Bytes on disk, every segment.
    pub fn bytes(&self) -> u64 {
        self.active_len + self.sealed.iter().map(|s| s.1).sum::<u64>()
    }

    /// The newest segment reached its size: the caller should [`Spool::roll`].
    pub fn should_roll(&self) -> bool {
        self.active_len >= self.segment_bytes
    }

    /// Seal the newest segment and start another.
    /// Does nothing while the newest segment holds no entry.
    pub fn roll(&mut self) -> Result<(), SpoolError> {
        if self.active_base == self.next_seq {
            return Ok(());
        }
        self.sync()?;
        let (f, len) = Self::create_segment(&self.dir, self.next_seq)?;
        self.sealed.push((self.active_base, self.active_len));
        self.active = f;
        self.active_base = self.next_seq;
        self.active_len = len;
        Ok(())
    }

    /// Append one entry (buffered; written and durable after [`Spool::sync`]). Returns its seq.
    pub fn append(&mut self, at: i64, kind: u8, payload: &[u8]) -> Result<u64, SpoolError> {
        if BODY_FIXED + payload.len() > MAX_ENTRY {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let seq = self.next_seq;
        let before = self.buf.len();
        encode(&mut self.buf, seq, at, kind, payload);
        self.active_len += (self.buf.len() - before) as u64;
        self.next_seq += 1;
        self.dirty = true;
        if self.buf.len() >= WRITE_BUF {
            self.write_out()?;
        }
        Ok(seq)
    }

    fn write_out(&mut self) -> Result<(), SpoolError> {
        if !self.buf.is_empty() {
            self.active.write_all(&self.buf).map_err(io_err(&self.dir))?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Make every appended entry durable (one write and one fdatasync).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.write_out()?;
        if self.dirty {
            self.active.sync_data().map_err(io_err(&self.dir))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Delete sealed segments every entry of which is at or below `acked`. Returns bytes freed.
    pub fn gc(&mut self, acked: u64) -> u64 {
        let mut freed = 0;
        while !self.sealed.is_empty() {
            let next_base = self.sealed.get(1).map_or(self.active_base, |s| s.0);
            if next_base > acked + 1 {
                break;
            }
            let (base, len) = self.sealed.remove(0);
            let _ = fs::remove_file(self.dir.join(seg_name(base)));
            freed += len;
        }
        freed
    }

    /// Drop the oldest sealed segment whatever the cursors say (budget policy). Returns the
    /// seq range dropped and its bytes, or None when only the newest segment is left.
    pub fn drop_oldest(&mut self) -> Option<(u64, u64, u64)> {
        if self.sealed.is_empty() {
            return None;
        }
        let (base, len) = self.sealed.remove(0);
        let end = self.sealed.first().map_or(self.active_base, |s| s.0);
        let _ = fs::remove_file(self.dir.join(seg_name(base)));
        Some((base, end, len))
    }

    /// First seq still on disk.
    pub fn first_seq(&self) -> u64 {
        self.sealed.first().map_or(self.active_base, |s| s.0)
    }

    /// Sealed segments, newest first, as paths (for recovery scans).
    pub fn sealed_paths_newest_first(&self) -> Vec<(u64, PathBuf)> {
        self.sealed
            .iter()
            .rev()
            .map(|(b, _)| (*b, self.dir.join(seg_name(*b))))
            .collect()
    }
}

/// Write a small file: temp, (fsync), rename.
pub fn write_atomic(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)?;
    if durable {
        if let Some(d) = path.parent().and_then(|p| File::open(p).ok()) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A consumer's cursor: every entry up to this seq is delivered.
pub fn read_cursor(dir: &Path, consumer: &str) -> u64 {
    fs::read_to_string(dir.join(format!("cursor-{consumer}")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn write_cursor(dir: &Path, consumer: &str, seq: u64) -> io::Result<()> {
    write_atomic(
        &dir.join(format!("cursor-{consumer}")),
        seq.to_string().as_bytes(),
        false,
    )
}

/// Streams entries after a cursor, segment by segment, never past `upto`.
pub struct Reader {
    dir: PathBuf,
    cur: Option<(u64, SegmentReader)>,
    /// Last seq returned (or the cursor it started from).
    pub after: u64,
    /// Bytes skipped as corrupt so far, and how many times.
    pub skipped_bytes: u64,
    pub corrupt_spots: u64,
}

impl Reader {
    pub fn new(dir: &Path, after: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            cur: None,
            after,
            skipped_bytes: 0,
            corrupt_spots: 0,
        }
    }

    /// The next entry with `after < seq <= upto`, or None when there is none yet.
    pub fn next(&mut self, upto: u64) -> io::Result<Option<Entry>> {
        loop {
            if self.after >= upto {
                return Ok(None);
            }
            if self.cur.is_none() {
                // The segment holding after+1: the last one whose base is <= after+1, or the
                // first one after (entries before it were dropped).
                let segs = segments(&self.dir)?;
                let want = self.after + 1;
                let pick = segs
                    .iter()
                    .rev()
                    .find(|s| s.0 <= want)
                    .or_else(|| segs.iter().find(|s| s.0 > want));
                let Some((base, path, _)) = pick else { return Ok(None) };
                match SegmentReader::open(path) {
                    Ok(r) => self.cur = Some((*base, r)),
                    // Deleted under us (gc or budget): list again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            let (base, r) = self.cur.as_mut().expect("set above");
            let base = *base;
            r.refresh();
            match r.next_entry() {
                Read1::Entry(e) if e.seq <= self.after => continue,
                Read1::Entry(e) if e.seq > upto => {
                    // Not committed yet (cannot happen with a correct `upto`); re-read later.
                    self.cur = None;
                    return Ok(None);
                }
                Read1::Entry(e) => {
                    self.after = e.seq;
                    return Ok(Some(e));
                }
                end @ (Read1::End | Read1::Corrupt { .. }) => {
                    if let Read1::Corrupt { skipped, .. } = end {
                        self.skipped_bytes += skipped;
                        self.corrupt_spots += 1;
                    }
                    // Move on only if a newer segment exists; otherwise wait for more data.
                    let segs = segments(&self.dir)?;
                    match segs.iter().find(|s| s.0 > base) {
                        Some(next) => {
                            // Entries between what we read and the next segment's base are
                            // gone (corrupt or never written): step over them.
                            self.after = self.after.max(next.0 - 1);
                            self.cur = None;
                        }
                        None => {
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(dir: &Path, after: u64, upto: u64) -> (Vec<(u64, Vec<u8>)>, Reader) {
        let mut r = Reader::new(dir, after);
        let mut out = Vec::new();
        while let Some(e) = r.next(upto).unwrap() {
            out.push((e.seq, e.payload));
        }
        (out, r)
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append entries of these sizes, then sync.
        Append(Vec<u8>),
        /// kill -9 and start again; with a torn partial entry at the end when true.
        Reopen(bool),
        /// Every consumer acknowledged up to this fraction of what was written.
        Ack(u8),
        Roll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec(0u8..200, 1..20).prop_map(Op::Append),
            1 => any::<bool>().prop_map(Op::Reopen),
            1 => (0u8..=100).prop_map(Op::Ack),
            1 => Just(Op::Roll),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The spool against a model (a Vec of what was synced): every synced entry is read back
        /// exactly once and in order by a reader from any cursor at or after the last ack,
        /// across restarts with and without torn tails; sequence numbers never repeat.
        #[test]
        fn spool_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("s");
            let (mut sp, _) = Spool::open(&dir, 600).unwrap();
            let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut acked = 0u64;
            let mut torn_bytes = 0u64;
            for op in ops {
                match op {
                    Op::Append(sizes) => {
                        for s in sizes {
                            let payload = vec![s; s as usize];
                            let seq = sp.append(model.len() as i64, 1, &payload).unwrap();
                            prop_assert!(model.last().is_none_or(|l| seq > l.0), "seq {} after {:?}", seq, model.last().map(|l| l.0));
                            model.push((seq, payload));
                        }
                        sp.sync().unwrap();
                    }
                    Op::Reopen(torn) => {
                        if torn {
                            // A partial entry: a header promising more bytes than follow.
                            let mut f = OpenOptions::new().append(true).open(dir.join(seg_name(sp.active_base()))).unwrap();
                            f.write_all(&[50, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
                            torn_bytes += 10;
                        }
                        drop(sp);
                        let (s, rec) = Spool::open(&dir, 600).unwrap();
                        prop_assert_eq!(rec.skipped_bytes, if torn { 10 } else { 0 });
                        sp = s;
                    }
                    Op::Ack(pct) => {
                        let n = model.len() * pct as usize / 100;
                        let a = if n == 0 { 0 } else { model[n - 1].0 };
                        acked = acked.max(a);
                        sp.gc(acked);
                    }
                    Op::Roll => sp.roll().unwrap(),
                }
                let upto = sp.next_seq() - 1;
                let (got, r) = read_all(&dir, acked, upto);
                let want: Vec<(u64, Vec<u8>)> = model.iter().filter(|e| e.0 > acked).cloned().collect();
                prop_assert_eq!(got, want);
                prop_assert!(r.skipped_bytes <= torn_bytes);
            }
        }
    }

    proptest! {
        /// Whatever bytes a segment holds (a disk error, an edit by hand), reading it ends,
        /// without a panic, after at most one entry per header.
        #[test]
        fn any_bytes_read_as_entries_or_corruption(body in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("00000000000000000001.seg");
            let mut bytes = if magic { MAGIC.to_vec() } else { Vec::new() };
            bytes.extend(&body);
            fs::write(&path, &bytes).unwrap();
            let mut r = SegmentReader::open(&path).unwrap();
            let mut steps = 0;
            loop {
                steps += 1;
                prop_assert!(steps <= bytes.len() / HEADER + 2, "reading must end");
                match r.next_entry() {
                    Read1::Entry(_) => {}
                    Read1::End | Read1::Corrupt { .. } => break,
                }
            }
        }
    }

    #[test]
    fn a_byte_flipped_by_hand_skips_the_rest_of_that_segment_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let (mut sp, _) = Spool::open(&dir, 4096).unwrap();
        for i in 0..10u8 {
            sp.append(0, 1, &[i; 100]).unwrap();
        }
        sp.roll().unwrap();
        for i in 10..15u8 {
            sp.append(0, 1, &[i; 100]).unwrap();
        }
        sp.sync().unwrap();
        // Flip a payload byte of the 4th entry of the first segment.
        let first = dir.join(seg_name(1));
        let mut bytes = fs::read(&first).unwrap();
        bytes[8 + 3 * 125 + 30] ^= 0xff;
        fs::write(&first, &bytes).unwrap();
        drop(sp);
        let (sp, rec) = Spool::open(&dir, 4096).unwrap();
        assert_eq!(rec.skipped_bytes, 0, "the newest segment is intact");
        assert_eq!(sp.next_seq(), 16);
        let (got, r) = read_all(&dir, 0, 15);
        let seqs: Vec<u64> = got.iter().map(|e| e.0).collect();
        assert_eq!(seqs, vec![1, 2, 3, 11, 12, 13, 14, 15]);
        assert_eq!(r.corrupt_spots, 1);
        assert_eq!(r.skipped_bytes, 7 * 125);
    }

    #[test]
    fn a_damaged_newest_segment_never_lets_a_seq_repeat() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let (mut sp, _) = Spool::open(&dir, 1 << 20).unwrap();
        for _ in 0..5 {
            sp.append(0, 1, b"x").unwrap();
        }
        sp.sync().unwrap();
        let path = dir.join(seg_name(1));
        let mut bytes = fs::read(&path).unwrap();
        bytes[8 + 4] ^= 1; // first entry's checksum
        fs::write(&path, &bytes).unwrap();
        drop(sp);
        let (sp, rec) = Spool::open(&dir, 1 << 20).unwrap();
        assert!(rec.skipped_bytes > 0);
        assert!(sp.next_seq() > 5, "next seq {}", sp.next_seq());
    }

    #[test]
    fn drop_oldest_and_gc_free_whole_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let (mut sp, _) = Spool::open(&dir, 4096).unwrap();
        for i in 0..3 {
            for _ in 0..10 {
                sp.append(i, 1, &[0; 100]).unwrap();
            }
            sp.roll().unwrap();
        }
        assert_eq!(segments(&dir).unwrap().len(), 4);
        assert_eq!(sp.gc(15), 8 + 10 * 125, "only the first segment is fully acknowledged");
        assert_eq!(sp.drop_oldest(), Some((11, 21, 8 + 10 * 125)));
        assert_eq!(sp.first_seq(), 21);
        let (got, _) = read_all(&dir, 5, 30);
        assert_eq!(
            got.first().map(|e| e.0),
            Some(21),
            "a reader behind skips what was dropped"
        );
    }
}
