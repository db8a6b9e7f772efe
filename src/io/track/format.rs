//! Events' `format` files and the decoding of one record's payload.
//!
//! Owns the field offsets of the block events and of the marker
//! (`ftrace/raw_data`), read from each event's `format` file, and turns a
//! payload into a [`Record`]. Knows nothing of files or pages; never panics
//! on any bytes (a record that does not fit its format is skipped).

use super::{BlockEvent, Op, Phase};

/// One field of an event's record: where it lies and how wide it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// Offset in the payload.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// An event's `format` file: its id and fields by name.
#[derive(Clone, Debug)]
pub struct EventFormat {
    /// The event id (`common_type` of its records).
    pub id: u16,
    fields: Vec<(String, Field)>,
}

impl EventFormat {
    /// Parses a `format` file's text; `None` without an id.
    pub fn parse(text: &str) -> Option<EventFormat> {
        let mut id = None;
        let mut fields = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("ID:") {
                id = n.trim().parse().ok();
            } else if let Some(decl) = line.strip_prefix("field:") {
                if let Some(f) = parse_field(decl) {
                    fields.push(f);
                }
            }
        }
        Some(EventFormat { id: id?, fields })
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<Field> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, f)| *f)
    }
}

/// `dev_t dev;\toffset:8;\tsize:4;\tsigned:0;` into ("dev", Field).
fn parse_field(decl: &str) -> Option<(String, Field)> {
    let mut parts = decl.split(';').map(str::trim);
    let name = parts.next()?.split_whitespace().last()?;
    let name = name.split('[').next()?.to_owned();
    let mut offset = None;
    let mut size = None;
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.trim().parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.trim().parse().ok();
        }
    }
    Some((
        name,
        Field {
            offset: offset?,
            size: size?,
        },
    ))
}

/// The fields of a block event we read.
#[derive(Clone, Copy, Debug)]
pub struct BlockFormat {
    id: u16,
    phase: Phase,
    dev: Field,
    sector: Field,
    nr_sector: Field,
    rwbs: Field,
}

impl BlockFormat {
    /// The block event described by `format`, recorded at `phase`; `None`
    /// when a field we need is missing.
    pub fn new(format: &EventFormat, phase: Phase) -> Option<BlockFormat> {
        Some(BlockFormat {
            id: format.id,
            phase,
            dev: format.field("dev")?,
            sector: format.field("sector")?,
            nr_sector: format.field("nr_sector")?,
            rwbs: format.field("rwbs")?,
        })
    }
}

/// The fields of the marker event (`ftrace/raw_data`: an `id` and a buffer).
#[derive(Clone, Copy, Debug)]
pub struct MarkerFormat {
    id: u16,
    tag: Field,
    buf: Field,
}

impl MarkerFormat {
    /// The marker event described by `format`.
    pub fn new(format: &EventFormat) -> Option<MarkerFormat> {
        Some(MarkerFormat {
            id: format.id,
            tag: format.field("id")?,
            buf: format.field("buf")?,
        })
    }
}

/// What one record is to us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A block operation (of any device, any op: the caller filters).
    Block(BlockEvent),
    /// A marker written to `trace_marker_raw`: its tag and first 16 bytes.
    Marker {
        /// The u32 written first.
        tag: u32,
        /// The next 16 bytes (two little-endian u64).
        words: [u64; 2],
    },
    /// Something we do not read (an unknown id, a read, a flush, a record
    /// that does not fit its format).
    Skip,
}

/// Decodes records by their `common_type`.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// The block events, by id.
    pub blocks: Vec<BlockFormat>,
    /// The marker event.
    pub marker: MarkerFormat,
}

impl Decoder {
    /// What `payload` is; [`Record::Skip`] for anything unknown or
    /// malformed.
    pub fn decode(&self, payload: &[u8]) -> Record {
        let Some(id) = uint(payload, Field { offset: 0, size: 2 }) else {
            return Record::Skip;
        };
        if id == u64::from(self.marker.id) {
            return self.marker(payload).unwrap_or(Record::Skip);
        }
        match self.blocks.iter().find(|b| u64::from(b.id) == id) {
            Some(b) => block(b, payload).map_or(Record::Skip, Record::Block),
            None => Record::Skip,
        }
    }

    fn marker(&self, payload: &[u8]) -> Option<Record> {
        let tag = u32::try_from(uint(payload, self.marker.tag)?).ok()?;
        let at = self.marker.buf.offset;
        let w = |i: usize| {
            uint(
                payload,
                Field {
                    offset: at + 8 * i,
                    size: 8,
                },
            )
        };
        Some(Record::Marker {
            tag,
            words: [w(0)?, w(1)?],
        })
    }
}

/// A block record's event; `None` when it does not fit or is not a change
/// (a read, or no sectors).
fn block(f: &BlockFormat, payload: &[u8]) -> Option<BlockEvent> {
    let rwbs = payload.get(f.rwbs.offset..f.rwbs.offset.checked_add(f.rwbs.size)?)?;
    let op = op_of(rwbs)?;
    let sectors = u32::try_from(uint(payload, f.nr_sector)?).ok()?;
    if sectors == 0 {
        return None;
    }
    Some(BlockEvent {
        dev: u32::try_from(uint(payload, f.dev)?).ok()?,
        sector: uint(payload, f.sector)?,
        sectors,
        op,
        phase: f.phase,
    })
}

/// The operation named by an `rwbs` string (kernel/trace/blktrace.c,
/// `blk_fill_rwbs`): an optional `F` (preflush), then the op: `W` write
/// (`WZ` write-zeroes on kernels that name it), `D` discard (`DE` secure
/// erase), `R` read, `F` a bare flush, `N` write-zeroes on this kernel (and
/// any op the kernel has no letter for), `Z…` zone operations. `None` for
/// reads and bare flushes; any other letter is [`Op::Other`].
pub fn op_of(rwbs: &[u8]) -> Option<Op> {
    let end = rwbs.iter().position(|&c| c == 0).unwrap_or(rwbs.len());
    let s = &rwbs[..end];
    let s = match s {
        [b'F', rest @ ..] if !rest.is_empty() && !matches!(rest[0], b'U' | b'A' | b'S' | b'M') => {
            rest
        }
        _ => s,
    };
    match s {
        [] | [b'R', ..] => None,
        [b'F'] | [b'F', b'U' | b'A' | b'S' | b'M', ..] => None,
        [b'W', b'Z', ..] | [b'N', ..] => Some(Op::WriteZeroes),
        [b'W', ..] => Some(Op::Write),
        [b'D', ..] => Some(Op::Discard),
        _ => Some(Op::Other),
    }
}

/// The unsigned little-endian integer of `field` in `payload`.
fn uint(payload: &[u8], field: Field) -> Option<u64> {
    let b = payload.get(field.offset..field.offset.checked_add(field.size)?)?;
    Some(match *b {
        [a] => u64::from(a),
        [a, b] => u64::from(u16::from_le_bytes([a, b])),
        [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
        [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::page::{Page, PageLayout};
    use super::*;

    /// Pages captured on this kernel (6.18) from a loop device 7:0: a 4 KiB
    /// write at sector 0, 300 ms later a 512-byte write at the last sector
    /// (a time extend precedes it), a discard of 64 KiB at 1 MiB, all
    /// submitted on CPU 0; three 8 KiB writes at 80 KiB on CPU 1; the
    /// completions (ksoftirqd) on CPU 1; a marker on each CPU. Made with
    /// `taskset`, `dd oflag=direct`, `blkdiscard` and
    /// `dd if=per_cpu/cpuN/trace_pipe_raw bs=4096 iflag=nonblock`.
    fn fixture() -> (Decoder, [&'static [u8]; 2]) {
        let f = |t: &str| EventFormat::parse(t).unwrap();
        let queue = f(include_str!(
            "../../../tests/fixtures/tracefs/block_bio_queue.format"
        ));
        let rq = f(include_str!(
            "../../../tests/fixtures/tracefs/block_rq_complete.format"
        ));
        let bio = f(include_str!(
            "../../../tests/fixtures/tracefs/block_bio_complete.format"
        ));
        let raw = f(include_str!(
            "../../../tests/fixtures/tracefs/raw_data.format"
        ));
        let decoder = Decoder {
            blocks: vec![
                BlockFormat::new(&queue, Phase::Queued).unwrap(),
                BlockFormat::new(&rq, Phase::Completed).unwrap(),
                BlockFormat::new(&bio, Phase::Completed).unwrap(),
            ],
            marker: MarkerFormat::new(&raw).unwrap(),
        };
        let pages = [
            &include_bytes!("../../../tests/fixtures/tracefs/cpu0.pages")[..],
            &include_bytes!("../../../tests/fixtures/tracefs/cpu1.pages")[..],
        ];
        (decoder, pages)
    }

    fn records(decoder: &Decoder, page: &[u8]) -> Vec<Record> {
        let page = Page::new(page, &PageLayout::X86_64).unwrap();
        assert!(!page.missed);
        page.map(|p| decoder.decode(p)).collect()
    }

    fn ev(sector: u64, sectors: u32, op: Op, phase: Phase) -> Record {
        Record::Block(BlockEvent {
            dev: 7 << 20,
            sector,
            sectors,
            op,
            phase,
        })
    }

    #[test]
    fn pages_captured_on_this_kernel() {
        let (decoder, [cpu0, cpu1]) = fixture();
        let marker = Record::Marker {
            tag: u32::from_le_bytes(*b"npdr"),
            words: [
                u64::from_le_bytes(*b"ABCDEFGH"),
                u64::from_le_bytes(*b"12345678"),
            ],
        };
        let (q, c) = (Phase::Queued, Phase::Completed);
        assert_eq!(
            records(&decoder, cpu0),
            vec![
                ev(0, 8, Op::Write, q),
                ev(32767, 1, Op::Write, q),
                ev(2048, 128, Op::Discard, q),
                marker.clone()
            ]
        );
        let mut want = vec![
            ev(0, 8, Op::Write, c),
            ev(32767, 1, Op::Write, c),
            ev(2048, 128, Op::Discard, c),
        ];
        for s in [160, 176, 192] {
            want.extend([ev(s, 16, Op::Write, q), ev(s, 16, Op::Write, c)]);
        }
        want.push(marker);
        assert_eq!(records(&decoder, cpu1), want);
    }

    #[test]
    fn unknown_ids_and_short_records_are_skipped() {
        let (decoder, _) = fixture();
        assert_eq!(decoder.decode(&[0xFF, 0xFF, 0, 0]), Record::Skip);
        assert_eq!(decoder.decode(&[]), Record::Skip);
        let id = decoder.blocks[0].id.to_le_bytes();
        assert_eq!(decoder.decode(&[id[0], id[1], 0, 0, 0, 0]), Record::Skip);
    }

    #[test]
    fn rwbs_letters() {
        assert_eq!(op_of(b"WS\0\0"), Some(Op::Write));
        assert_eq!(op_of(b"FWFS"), Some(Op::Write));
        assert_eq!(op_of(b"WFS"), Some(Op::Write));
        assert_eq!(op_of(b"DS"), Some(Op::Discard));
        assert_eq!(op_of(b"DE"), Some(Op::Discard));
        assert_eq!(op_of(b"NS"), Some(Op::WriteZeroes));
        assert_eq!(op_of(b"WZ"), Some(Op::WriteZeroes));
        assert_eq!(op_of(b"ZA"), Some(Op::Other));
        assert_eq!(op_of(b"R"), None);
        assert_eq!(op_of(b"RA"), None);
        assert_eq!(op_of(b"F"), None);
        assert_eq!(op_of(b"FS"), None);
        assert_eq!(op_of(b""), None);
    }
}
