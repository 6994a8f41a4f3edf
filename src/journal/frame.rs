//! Byte format of the journal: header and frames. Pure functions over byte slices
//! (and over a file read front to back, [`scan_read`]).
//!
//! Owns: encoding a batch of records into one frame, and [`scan`], the single
//! reader every caller (recovery, `journal verify`, `journal show`, the fuzzer)
//! uses, so they can never disagree about where the valid prefix ends. Its two
//! other faces are the same reader: [`scan_with`] hands each record to a sink as
//! it is decoded, and [`scan_read`] does so reading a file one frame at a time.

use crate::journal::event::Record;

/// File magic.
pub const MAGIC: &[u8; 8] = b"STACKJNL";
/// The format version this build writes. The rule: any change to the bytes a
/// record encodes to (a new event variant, a changed field, a changed frame) makes
/// a new version, so that an older build meets a newer journal as "written by a
/// newer stack" (its header's version) and never as corruption. The encoding of
/// every event is pinned by `tests/journal_golden.rs`.
///
/// Version 2 is the encoding of today's [`Event`](crate::journal::event::Event)
/// list. Version 1 is its prefix without `Request` and `Place`, yet builds that had
/// those two wrote them under version 1 too; both decode with this build's decoder
/// (variants are numbered by position and only ever added at the end).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build reads (and upgrades before appending, see
/// `Journal::sync`): its files decode with today's decoder.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Header: magic (8) + version u32 LE (4) + crc32 of those 12 bytes, u32 LE (4).
pub const HEADER_LEN: usize = 16;
/// Frame header: payload length u32 LE (4) + crc32 over length and payload (4).
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest payload a frame may claim; checked before anything is allocated.
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// bincode "claims" at most 8 bytes against its decode limit per byte of input (a
/// varint of one byte decodes as a u64 and claims 8; string bytes claim 1 each), so
/// any payload of `n` bytes that `encode_frame` wrote decodes within a limit of `8n`.
const CLAIM_PER_BYTE: usize = 8;

/// Decode limits, smallest first: powers of four from 4 KiB, then the largest
/// claim a payload of [`MAX_PAYLOAD`] bytes can make.
const DECODE_LIMITS: [usize; 11] = [
    1 << 12,
    1 << 14,
    1 << 16,
    1 << 18,
    1 << 20,
    1 << 22,
    1 << 24,
    1 << 26,
    1 << 28,
    1 << 30,
    MAX_PAYLOAD * CLAIM_PER_BYTE,
];

/// The decode limit for a payload of `len` bytes: the first of [`DECODE_LIMITS`] at
/// or above `8 × len`, so never below what a valid payload claims, and never more
/// than 32 × `len` (or 4 KiB).
fn decode_limit(len: usize) -> usize {
    let need = len.saturating_mul(CLAIM_PER_BYTE);
    DECODE_LIMITS
        .into_iter()
        .find(|&limit| limit >= need)
        .unwrap_or(DECODE_LIMITS[DECODE_LIMITS.len() - 1])
}

/// Decode a frame's payload (a `Vec<Record>`) under [`decode_limit`], handing each
/// record to `each` as it is decoded instead of collecting them (the same decoder
/// and the same limit as decoding the whole list: bincode counts its claims over
/// the whole payload, and a list claims nothing of its own). Returns the number of
/// records and the bytes used. A payload that fails part way has already handed
/// its first records to `each`.
///
/// Why a limit proportional to the payload rather than one fixed limit: bincode
/// allocates a string's buffer from its *declared* length as soon as that length
/// passes the limit, before reading the bytes. A fixed limit of [`MAX_PAYLOAD`]
/// would let a frame of a few bytes with a valid checksum make the reader allocate
/// up to 256 MiB, and would reject a valid frame larger than `MAX_PAYLOAD / 8`
/// bytes made of small integers (its claims exceed 256 MiB), which recovery would
/// then cut as a torn tail.
fn decode_payload(payload: &[u8], each: &mut dyn FnMut(Record)) -> Result<(usize, usize), String> {
    fn with_limit<const LIMIT: usize>(
        payload: &[u8],
        each: &mut dyn FnMut(Record),
    ) -> Result<(usize, usize), String> {
        let config = bincode::config::standard().with_limit::<LIMIT>();
        bincode::serde::seed_decode_from_slice(EachRecord(each), payload, config).map_err(|e| {
            match e {
                // A decoder's own refusal (a value stack never writes, a variant
                // this build does not know): its message, as it said it.
                bincode::error::DecodeError::OtherString(why) => why,
                e => e.to_string(),
            }
        })
    }
    macro_rules! dispatch {
        ($($i:literal)*) => {
            match decode_limit(payload.len()) {
                $(l if l == DECODE_LIMITS[$i] => with_limit::<{ DECODE_LIMITS[$i] }>(payload, each),)*
                _ => with_limit::<{ MAX_PAYLOAD * CLAIM_PER_BYTE }>(payload, each),
            }
        };
    }
    dispatch!(0 1 2 3 4 5 6 7 8 9)
}

/// Deserializes a `Vec<Record>`'s encoding, handing each record on as it comes.
struct EachRecord<'f>(&'f mut dyn FnMut(Record));

impl<'de> serde::de::DeserializeSeed<'de> for EachRecord<'_> {
    type Value = usize;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EachRecord<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let each = self.0;
        let mut n = 0;
        while let Some(r) = seq.next_element::<Record>()? {
            each(r);
            n += 1;
        }
        Ok(n)
    }
}

/// The 16-byte header of a new journal.
pub fn header() -> [u8; HEADER_LEN] {
    header_of(FORMAT_VERSION)
}

/// The 16-byte header of a journal of format `version`.
pub fn header_of(version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The format version a whole, valid header names (`None` if `head` is not one).
pub fn header_version(head: &[u8]) -> Option<u32> {
    let h: &[u8; HEADER_LEN] = head.get(..HEADER_LEN)?.try_into().ok()?;
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    (*h == header_of(version)).then_some(version)
}

/// Does this build read journals of format `version`?
pub fn is_readable_version(version: u32) -> bool {
    (OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version)
}

/// Encode a batch of records as one frame. A frame is the unit of atomicity: after
/// a crash it is either entirely valid or not there.
pub fn encode_frame(records: &[Record]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_frame_into(&mut out, records)?;
    Ok(out)
}

/// Append one frame holding `records` to `out`. `records` is anything that
/// serializes as a `Vec<Record>` does (a slice of borrowed mirrors, as a checkpoint
/// uses, gives the same bytes). The payload is measured first and encoded straight
/// into `out`, grown once to its exact size: a large batch is never held twice nor
/// in a buffer grown by doubling. On error `out` is left as it was.
pub fn encode_frame_into<T: serde::Serialize + ?Sized>(
    out: &mut Vec<u8>,
    records: &T,
) -> Result<(), String> {
    let failed = |e: bincode::error::EncodeError| format!("encoding journal records: {e}");
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(records, &mut size, bincode_config()).map_err(failed)?;
    let len = size.bytes_written;
    if len > MAX_PAYLOAD {
        return Err(format!(
            "journal batch of {len} bytes exceeds the {MAX_PAYLOAD} byte frame limit"
        ));
    }
    let start = out.len();
    out.reserve_exact(FRAME_HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let at = out.len();
    out.resize(at + len, 0);
    match bincode::serde::encode_into_slice(records, &mut out[at..], bincode_config()) {
        Ok(written) if written == len => {}
        Ok(written) => {
            out.truncate(start);
            return Err(format!(
                "encoding journal records: {written} bytes written, {len} measured"
            ));
        }
        Err(e) => {
            out.truncate(start);
            return Err(failed(e));
        }
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[start..start + 4]);
    hasher.update(&out[at..]);
    let crc = hasher.finalize().to_le_bytes();
    out[start + 4..at].copy_from_slice(&crc);
    Ok(())
}

/// A frame measured by [`measure_frame`]: its payload's length and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    len: u32,
    crc: u32,
}

impl Measured {
    /// The frame's whole length (header and payload) in bytes.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// A bincode sink that keeps only the length and the crc32 of what it is given.
struct Checksum {
    crc: crc32fast::Hasher,
    len: usize,
}

impl bincode::enc::write::Writer for Checksum {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.crc.update(bytes);
        self.len += bytes.len();
        Ok(())
    }
}

/// Measure the frame [`encode_frame_into`] would make of `records` (its length and
/// checksum) by encoding it into nothing, for [`write_frame`].
pub fn measure_frame<T: serde::Serialize + ?Sized>(records: &T) -> Result<Measured, String> {
    let mut sink = Checksum {
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    bincode::serde::encode_into_writer(records, &mut sink, bincode_config())
        .map_err(|e| format!("encoding journal records: {e}"))?;
    let len = sink.len;
    if len > MAX_PAYLOAD {
        return Err(format!(
            "journal batch of {len} bytes exceeds the {MAX_PAYLOAD} byte frame limit"
        ));
    }
    let len = len as u32;
    // The checksum covers the length, then the payload.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.combine(&sink.crc);
    Ok(Measured {
        len,
        crc: crc.finalize(),
    })
}

/// Write the frame of `records`, as measured by [`measure_frame`], to `w`, encoding
/// the payload straight into it: the same bytes as [`encode_frame_into`] without
/// ever holding them (a checkpoint of a large state is not buffered whole). An
/// encoding that does not match the measure is an error; `w` may then hold part of
/// the frame.
pub fn write_frame<W: std::io::Write, T: serde::Serialize + ?Sized>(
    w: &mut W,
    records: &T,
    measured: Measured,
) -> std::io::Result<()> {
    w.write_all(&measured.len.to_le_bytes())?;
    w.write_all(&measured.crc.to_le_bytes())?;
    let written = bincode::serde::encode_into_std_write(records, w, bincode_config())
        .map_err(|e| std::io::Error::other(format!("encoding journal records: {e}")))?;
    if written != measured.len as usize {
        return Err(std::io::Error::other(format!(
            "encoding journal records: {written} bytes written, {} measured",
            measured.len
        )));
    }
    Ok(())
}

/// How the scan of a journal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every byte belongs to a valid frame.
    Clean,
    /// The bytes from `offset` on are an incomplete or damaged last frame with
    /// nothing valid after it: a torn append. Recovery may cut them (keeping a copy).
    TornTail { offset: u64, reason: String },
    /// A bad frame at `offset` is followed by valid data, or a valid frame breaks
    /// the sequence: the journal is corrupt and must not be cut or rewritten.
    Corrupt {
        offset: u64,
        record: u64,
        reason: String,
    },
    /// The header names a format version this build does not read.
    UnknownVersion { found: u32 },
}

/// The result of reading a journal's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    /// Valid records in order, each with the byte offset of its frame.
    pub records: Vec<(u64, Record)>,
    /// Length of the valid prefix (header + whole valid frames).
    pub valid_len: u64,
    pub end: End,
}

/// Why the bytes at an offset are not a valid frame.
struct BadFrame {
    reason: String,
    /// The checksum matched: these bytes were written whole, so they are not a
    /// torn append (a newer format, or a bug), and must never be cut.
    checksummed: bool,
}

impl From<String> for BadFrame {
    fn from(reason: String) -> Self {
        BadFrame {
            reason,
            checksummed: false,
        }
    }
}

/// Try to read one valid frame at `at`, handing its records to `each` as they are
/// decoded (a frame that then fails has handed some). `Ok((records, next_offset))`
/// or why it is not a valid frame.
fn frame_at(
    bytes: &[u8],
    at: usize,
    each: &mut dyn FnMut(Record),
) -> Result<(usize, usize), BadFrame> {
    let rest = &bytes[at..];
    if rest.len() < FRAME_HEADER_LEN {
        return Err(format!("incomplete frame header ({} bytes)", rest.len()).into());
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 {
        return Err("empty frame".to_string().into());
    }
    if len > MAX_PAYLOAD {
        return Err(format!("frame length {len} exceeds the limit").into());
    }
    if rest.len() - FRAME_HEADER_LEN < len {
        return Err(format!(
            "incomplete frame: {} of {len} payload bytes",
            rest.len() - FRAME_HEADER_LEN
        )
        .into());
    }
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&rest[..4]);
    hasher.update(payload);
    if hasher.finalize() != crc {
        return Err("checksum mismatch".to_string().into());
    }
    let written_whole = |reason: String| BadFrame {
        reason: format!("checksum valid but {reason} (not written by stack, or by a newer stack?)"),
        checksummed: true,
    };
    let (records, used) = decode_payload(payload, each)
        .map_err(|e| written_whole(format!("payload undecodable: {e}")))?;
    if used != len {
        return Err(written_whole("payload has trailing bytes".to_string()));
    }
    if records == 0 {
        return Err(written_whole("frame holds no record".to_string()));
    }
    Ok((records, at + FRAME_HEADER_LEN + len))
}

/// Is there any valid frame starting anywhere in `bytes[from..]`?
fn valid_frame_after(bytes: &[u8], from: usize) -> bool {
    (from..bytes.len().saturating_sub(FRAME_HEADER_LEN - 1)).any(|at| {
        let rest = &bytes[at..];
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        // Cheap filter before the checksum: the claimed length must fit. A frame
        // whose checksum holds was written whole, whether or not this build can
        // decode its payload: damage before it is corruption, never a torn tail.
        len != 0
            && len <= rest.len() - FRAME_HEADER_LEN
            && match frame_at(bytes, at, &mut |_| {}) {
                Ok(_) => true,
                Err(BadFrame { checksummed, .. }) => checksummed,
            }
    })
}

/// Where [`scan_with`] hands the records it reads.
pub trait Sink {
    /// The next record of the frame at `offset`, as it is decoded: the frame is not
    /// yet known to be valid, and its records are the journal's only once
    /// [`Sink::frame`] says so.
    fn record(&mut self, offset: u64, record: Record);
    /// The records handed since the last call make a valid frame (`true`: they are
    /// the journal's, in order) or they do not (`false`: forget them; the scan ends).
    fn frame(&mut self, valid: bool);
}

/// Collects the valid records, for [`scan`].
struct Collect {
    records: Vec<(u64, Record)>,
    kept: usize,
}

impl Sink for Collect {
    fn record(&mut self, offset: u64, record: Record) {
        self.records.push((offset, record));
    }
    fn frame(&mut self, valid: bool) {
        if valid {
            self.kept = self.records.len();
        } else {
            self.records.truncate(self.kept);
        }
    }
}

/// Read a journal's bytes: the valid records, and how the valid prefix ends.
///
/// The torn-tail rule: the first bad frame ends the valid prefix. If no valid frame
/// starts anywhere after it, the rest is a torn tail (an append that a crash cut
/// short); otherwise it is corruption. Records must continue the sequence
/// (`seq` strictly +1); a valid frame that breaks it is corruption too.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut sink = Collect {
        records: Vec::new(),
        kept: 0,
    };
    let (valid_len, end) = scan_with(bytes, &mut sink);
    Scan {
        records: sink.records,
        valid_len,
        end,
    }
}

/// [`scan`], handing the records to `sink` as they are decoded instead of holding
/// them all: the same reader (the same verdict, the same `End`), for a caller that
/// needs to look at each record once. Returns the length of the valid prefix and
/// how it ends.
pub fn scan_with(mut bytes: &[u8], sink: &mut dyn Sink) -> (u64, End) {
    match scan_input(&mut bytes, sink) {
        Ok(scanned) => scanned,
        Err(never) => match never {},
    }
}

/// [`scan_with`] of a journal file read front to back through `file`, holding one
/// frame at a time instead of the whole file (the check before an append, whose
/// caller holds a large state and plan meanwhile). `size` is the file's length if
/// known (0 if not), used only to size the buffer of a frame. An error reading is
/// an error, never taken for a torn or corrupt journal.
pub fn scan_read(
    file: impl std::io::Read,
    size: u64,
    sink: &mut dyn Sink,
) -> std::io::Result<(u64, End)> {
    scan_input(
        &mut ReadInput {
            file,
            buf: Vec::new(),
            size,
        },
        sink,
    )
}

/// Where the scan reads a journal's bytes: a slice, or a file read front to back.
trait Input {
    type Error;
    /// The first [`HEADER_LEN`] bytes, or all of them if there are fewer.
    fn head(&mut self) -> Result<&[u8], Self::Error>;
    /// The bytes from `at`, which is where the header or the last valid frame
    /// ended: at least the frame there (its header, and the payload it claims if
    /// its length is not refused before reading it) or everything left; empty at
    /// the end.
    fn frame(&mut self, at: usize) -> Result<&[u8], Self::Error>;
    /// Every byte from `at`, where [`Input::frame`] was last asked, to the end.
    fn rest(&mut self, at: usize) -> Result<&[u8], Self::Error>;
}

impl Input for &[u8] {
    type Error = std::convert::Infallible;
    fn head(&mut self) -> Result<&[u8], Self::Error> {
        Ok(&self[..self.len().min(HEADER_LEN)])
    }
    fn frame(&mut self, at: usize) -> Result<&[u8], Self::Error> {
        Ok(&self[at..])
    }
    fn rest(&mut self, at: usize) -> Result<&[u8], Self::Error> {
        Ok(&self[at..])
    }
}

/// A file read front to back: `buf` holds the header, then one frame at a time.
struct ReadInput<R> {
    file: R,
    buf: Vec<u8>,
    size: u64,
}

impl<R: std::io::Read> Input for ReadInput<R> {
    type Error = std::io::Error;
    fn head(&mut self) -> std::io::Result<&[u8]> {
        use std::io::Read;
        self.buf.clear();
        (&mut self.file)
            .take(HEADER_LEN as u64)
            .read_to_end(&mut self.buf)?;
        Ok(&self.buf)
    }
    fn frame(&mut self, at: usize) -> std::io::Result<&[u8]> {
        use std::io::Read;
        // A buffer of each frame's size, not of the largest so far: the last
        // frame of a large pull (its `Committed` fingerprints) decodes into about
        // as much again as its bytes.
        self.buf = Vec::with_capacity(FRAME_HEADER_LEN);
        (&mut self.file)
            .take(FRAME_HEADER_LEN as u64)
            .read_to_end(&mut self.buf)?;
        if self.buf.len() == FRAME_HEADER_LEN {
            let b = &self.buf;
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            // A length the frame check refuses is not read (nor allocated); the
            // buffer is sized by what the file can hold, never by the claim alone.
            if len != 0 && len <= MAX_PAYLOAD {
                let left = self.size.saturating_sub((at + FRAME_HEADER_LEN) as u64);
                self.buf
                    .reserve_exact(len.min(usize::try_from(left).unwrap_or(len)));
                (&mut self.file)
                    .take(len as u64)
                    .read_to_end(&mut self.buf)?;
            }
        }
        Ok(&self.buf)
    }
    fn rest(&mut self, _at: usize) -> std::io::Result<&[u8]> {
        self.file.read_to_end(&mut self.buf)?;
        Ok(&self.buf)
    }
}

/// The reader: [`scan_with`] over any [`Input`].
fn scan_input<I: Input>(input: &mut I, sink: &mut dyn Sink) -> Result<(u64, End), I::Error> {
    // The header.
    let bytes = input.head()?;
    if bytes.len() < HEADER_LEN {
        let end = if (OLDEST_READABLE_VERSION..=FORMAT_VERSION)
            .any(|v| bytes[..] == header_of(v)[..bytes.len()])
            || bytes.len() < 8 && MAGIC.starts_with(bytes)
        {
            End::TornTail {
                offset: 0,
                reason: format!("incomplete header ({} bytes)", bytes.len()),
            }
        } else {
            End::Corrupt {
                offset: 0,
                record: 0,
                reason: "not a stack journal (bad magic)".to_string(),
            }
        };
        return Ok((0, end));
    }
    if &bytes[..8] != MAGIC {
        return Ok((
            0,
            End::Corrupt {
                offset: 0,
                record: 0,
                reason: "not a stack journal (bad magic)".to_string(),
            },
        ));
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32fast::hash(&bytes[..12]) != crc {
        return Ok((
            0,
            End::Corrupt {
                offset: 0,
                record: 0,
                reason: "header checksum mismatch".to_string(),
            },
        ));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if !is_readable_version(version) {
        return Ok((0, End::UnknownVersion { found: version }));
    }
    let mut at = HEADER_LEN;
    let mut next_seq: Option<u64> = None;
    // How many records the valid frames so far hold.
    let mut kept: u64 = 0;
    loop {
        let rest = input.frame(at)?;
        if rest.is_empty() {
            return Ok((at as u64, End::Clean));
        }
        // The first break of the sequence in this frame: (expected, found).
        let mut jump = None;
        let read = frame_at(rest, 0, &mut |r: Record| {
            if jump.is_none() {
                if let Some(want) = next_seq {
                    if r.seq != want {
                        jump = Some((want, r.seq));
                    }
                }
                next_seq = Some(r.seq + 1);
            }
            sink.record(at as u64, r);
        });
        match read {
            Ok((count, next)) => {
                if let Some((want, found)) = jump {
                    sink.frame(false);
                    return Ok((
                        at as u64,
                        End::Corrupt {
                            offset: at as u64,
                            record: kept,
                            reason: format!("sequence jumps from {} to {found}", want - 1),
                        },
                    ));
                }
                sink.frame(true);
                kept += count as u64;
                at += next;
            }
            Err(BadFrame {
                reason,
                checksummed,
            }) => {
                sink.frame(false);
                let end = if checksummed {
                    End::Corrupt {
                        offset: at as u64,
                        record: kept,
                        reason,
                    }
                } else if valid_frame_after(input.rest(at)?, 1) {
                    End::Corrupt {
                        offset: at as u64,
                        record: kept,
                        reason: format!("{reason}, followed by valid records"),
                    }
                } else {
                    End::TornTail {
                        offset: at as u64,
                        reason,
                    }
                };
                return Ok((at as u64, end));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::event::Event;
    use crate::model::state::StatFp;

    /// A frame with a correct length and checksum around `payload`.
    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut out = header().to_vec();
        let len = (payload.len() as u32).to_le_bytes();
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&len);
        hasher.update(payload);
        out.extend_from_slice(&len);
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_streamed_frame_is_byte_identical_to_an_encoded_one() {
        let records: Vec<Record> = (1..=300)
            .map(|seq| Record {
                seq,
                txn: 7,
                event: Event::MakeRef {
                    slot: crate::journal::event::Slot::Package(
                        format!("pkg{seq}").try_into().unwrap(),
                    ),
                    table_id: format!("tbl_{seq:06}").try_into().unwrap(),
                    name: "x".repeat(seq as usize % 40 + 1).try_into().unwrap(),
                    md5: format!("{seq:032x}").try_into().unwrap(),
                    size: Some(seq * 1000),
                    strategy: crate::model::state::Strategy::Copy,
                },
            })
            .collect();
        for batch in [&records[..0], &records[..1], &records[..]] {
            let encoded = encode_frame(batch).expect("encode");
            let measured = measure_frame(batch).expect("measure");
            assert_eq!(measured.frame_len(), encoded.len() as u64);
            let mut streamed = Vec::new();
            write_frame(&mut streamed, batch, measured).expect("write");
            assert_eq!(streamed, encoded);
        }
    }

    #[test]
    fn decode_limit_covers_every_valid_payload_and_stays_proportional() {
        for len in [
            1,
            7,
            512,
            513,
            4096,
            100_000,
            1 << 24,
            MAX_PAYLOAD / 8 + 1,
            MAX_PAYLOAD,
        ] {
            let limit = decode_limit(len);
            assert!(limit >= CLAIM_PER_BYTE * len, "len {len}: limit {limit}");
            assert!(limit <= (32 * len).max(4096), "len {len}: limit {limit}");
        }
    }

    /// 27 bytes of payload declaring a 128 MiB string fail the decode limit before
    /// the reader allocates the string's buffer.
    #[test]
    fn tiny_frame_declaring_a_huge_string_fails_the_limit_before_allocating() {
        // One record: seq 1, txn 1, variant 1 (Stage), md5 of 2^27 bytes (u64 varint).
        let mut payload = vec![1u8, 1, 1, 1, 253];
        payload.extend_from_slice(&(1u64 << 27).to_le_bytes());
        payload.extend_from_slice(b"abc");
        let scan = scan(&raw_frame(&payload));
        // Its checksum is valid, so it is corruption, never a torn tail to cut.
        match scan.end {
            End::Corrupt {
                offset: 16, reason, ..
            } => {
                assert!(reason.contains("LimitExceeded"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A payload of small integers claims up to 8 bytes per byte; it must decode.
    #[test]
    fn integer_heavy_payload_decodes_within_the_limit() {
        let zero = StatFp {
            size: 0,
            mtime_ns: 0,
            ino: 0,
        };
        let record = Record {
            seq: 1,
            txn: 1,
            event: Event::Committed {
                fingerprints: vec![(String::new(), zero); 20_000],
            },
        };
        let frame = encode_frame(std::slice::from_ref(&record)).unwrap();
        let mut bytes = header().to_vec();
        bytes.extend(frame);
        let scan = scan(&bytes);
        assert_eq!(scan.end, End::Clean);
        assert_eq!(scan.records, vec![(HEADER_LEN as u64, record)]);
    }

    /// A reader that hands out at most 3 bytes per call.
    struct Trickle<'a>(&'a [u8]);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// A read that fails partway is an I/O error wherever it falls (in a frame, or
    /// in the look past a damaged frame that decides torn tail or corruption),
    /// never a torn tail or corruption.
    #[test]
    fn a_read_error_anywhere_is_an_io_error() {
        struct FailsAfter<'a>(&'a [u8]);
        impl std::io::Read for FailsAfter<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
                let n = buf.len().min(5).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let stage = |seq: u64| Record {
            seq,
            txn: 1,
            event: Event::Stage {
                md5: format!("{seq:032x}").try_into().unwrap(),
                url: format!("tables/{seq}"),
            },
        };
        let mut bytes = header().to_vec();
        bytes.extend(encode_frame(&[stage(1), stage(2)]).expect("encode"));
        let damaged_at = bytes.len() + 6;
        bytes.extend(encode_frame(&[stage(3)]).expect("encode"));
        bytes.extend(encode_frame(&[stage(4)]).expect("encode"));
        let mut damaged = bytes.clone();
        damaged[damaged_at] ^= 0x41;
        for input in [&bytes, &damaged] {
            for served in 0..input.len() {
                let mut sink = Collect {
                    records: Vec::new(),
                    kept: 0,
                };
                let got = scan_read(FailsAfter(&input[..served]), input.len() as u64, &mut sink);
                assert!(got.is_err(), "{served} bytes served: {got:?}");
            }
        }
    }

    /// The file read front to back (`scan_read`, whatever size it is told) scans
    /// as the slice does: the same records, valid length and end for every prefix
    /// of a journal, every byte of it damaged, a break in the sequence, and frames
    /// claiming no payload or too large a one followed by valid frames.
    #[test]
    fn a_file_read_front_to_back_scans_as_its_bytes_do() {
        let stage = |seq: u64| Record {
            seq,
            txn: 1,
            event: Event::Stage {
                md5: format!("{seq:032x}").try_into().unwrap(),
                url: format!("tables/{seq}"),
            },
        };
        let mut bytes = header().to_vec();
        let mut seq = 0;
        for n in [1u64, 3, 2] {
            let batch: Vec<Record> = (seq + 1..=seq + n).map(stage).collect();
            seq += n;
            bytes.extend(encode_frame(&batch).expect("encode"));
        }
        let mut inputs: Vec<Vec<u8>> = (0..=bytes.len()).map(|cut| bytes[..cut].to_vec()).collect();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x41;
            inputs.push(damaged);
        }
        let mut jump = bytes.clone();
        jump.extend(encode_frame(&[stage(seq + 2)]).expect("encode"));
        inputs.push(jump);
        for claim in [0u32, u32::MAX] {
            let mut odd = bytes[..HEADER_LEN].to_vec();
            odd.extend_from_slice(&claim.to_le_bytes());
            odd.extend_from_slice(&[7; 4]);
            odd.extend_from_slice(&bytes[HEADER_LEN..]);
            inputs.push(odd);
        }
        for input in &inputs {
            let want = scan(input);
            for size in [0, input.len() as u64, u64::MAX] {
                let mut got = Collect {
                    records: Vec::new(),
                    kept: 0,
                };
                let (valid_len, end) = scan_read(Trickle(input), size, &mut got).expect("read");
                assert_eq!(got.records, want.records);
                assert_eq!((valid_len, &end), (want.valid_len, &want.end));
            }
        }
    }
}
