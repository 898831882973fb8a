//! Counts the Automerge operations in stored chunks (the `changes` of a sync message, the
//! bytes `load_incremental` takes) from their headers, without applying them.
//!
//! Why: a change of a few hundred bytes can expand to millions of operations (a run-length
//! encoded column says "4,000,000 times the same action"), and applying it costs seconds
//! and gigabytes. The count is read from the chunk's action column, whose run lengths say
//! how many operations there are: the cost is proportional to the bytes received, never to
//! the operations they claim. Must not: apply, verify or store anything (Automerge does that
//! once the count is within the limits).
//!
//! Formats (automerge's binary format, stable across versions): a chunk is magic bytes, a
//! checksum, a type byte (0 document, 1 change, 2 deflated change, 3 bundle) and a LEB128
//! length. Documents and changes list their columns as (spec, length) pairs; the action
//! column (id 4, integer RLE) has one row per operation.

use std::io::Read;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const ACTION_COLUMN_ID: u32 = 4;
/// Column type "integer" (run-length encoded unsigned LEB128).
const INTEGER_TYPE: u32 = 2;
const DEFLATE_BIT: u32 = 0b1000;
/// Largest inflated size of one compressed change or column we read (the counting needs
/// only the action column; a bomb stops here).
const MAX_INFLATED_BYTES: u64 = 32 * 1024 * 1024;
/// Operations of a chunk we cannot count are refused rather than guessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpCountError {
    #[error("the change data is malformed ({0})")]
    Malformed(&'static str),
    #[error("chunk type {0} is not accepted in sync messages")]
    UnsupportedChunk(u8),
}

/// The operations of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOps {
    /// A whole document (many changes) rather than one change.
    pub is_document: bool,
    pub ops: u64,
}

/// The number of operations in `bytes`: one or more concatenated chunks.
pub fn count_ops(bytes: &[u8]) -> Result<u64, OpCountError> {
    Ok(chunk_ops(bytes)?
        .iter()
        .fold(0u64, |acc, c| acc.saturating_add(c.ops)))
}

/// The operations of each chunk in `bytes`.
pub fn chunk_ops(bytes: &[u8]) -> Result<Vec<ChunkOps>, OpCountError> {
    let mut r = Reader::new(bytes);
    let mut out = Vec::new();
    while !r.is_empty() {
        if r.take(4)? != MAGIC {
            return Err(OpCountError::Malformed("no chunk header"));
        }
        r.take(4)?; // checksum
        let kind = r.byte()?;
        let len = r.uleb_usize()?;
        let body = r.take(len)?;
        let ops = match kind {
            0 => document_ops(body)?,
            1 => change_ops(body)?,
            2 => change_ops(&inflate(body)?)?,
            other => return Err(OpCountError::UnsupportedChunk(other)),
        };
        out.push(ChunkOps {
            is_document: kind == 0,
            ops,
        });
    }
    Ok(out)
}

fn change_ops(body: &[u8]) -> Result<u64, OpCountError> {
    let mut r = Reader::new(body);
    let deps = r.uleb_usize()?;
    r.take(
        deps.checked_mul(32)
            .ok_or(OpCountError::Malformed("deps"))?,
    )?;
    skip_bytes(&mut r)?; // actor
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.uleb()?; // time (signed; same byte layout to skip)
    skip_bytes(&mut r)?; // message
    let others = r.uleb_usize()?;
    for _ in 0..others {
        skip_bytes(&mut r)?;
    }
    let columns = columns(&mut r)?;
    let data = r.rest();
    action_rows(&columns, data)
}

fn document_ops(body: &[u8]) -> Result<u64, OpCountError> {
    let mut r = Reader::new(body);
    let actors = r.uleb_usize()?;
    for _ in 0..actors {
        skip_bytes(&mut r)?;
    }
    let heads = r.uleb_usize()?;
    r.take(
        heads
            .checked_mul(32)
            .ok_or(OpCountError::Malformed("heads"))?,
    )?;
    let change_columns = columns(&mut r)?;
    let op_columns = columns(&mut r)?;
    let change_len = change_columns
        .iter()
        .try_fold(0usize, |acc, c| acc.checked_add(c.len))
        .ok_or(OpCountError::Malformed("column lengths"))?;
    r.take(change_len)?;
    action_rows(&op_columns, r.rest())
}

struct Column {
    spec: u32,
    len: usize,
}

fn columns(r: &mut Reader<'_>) -> Result<Vec<Column>, OpCountError> {
    let n = r.uleb_usize()?;
    // Each column takes at least two bytes to describe: a count beyond that is a lie.
    if n > r.remaining() / 2 + 1 {
        return Err(OpCountError::Malformed("column count"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let spec = u32::try_from(r.uleb()?).map_err(|_| OpCountError::Malformed("spec"))?;
        let len = r.uleb_usize()?;
        out.push(Column { spec, len });
    }
    Ok(out)
}

/// Rows of the action column among `columns`, whose data follows in `data` in order.
fn action_rows(columns: &[Column], data: &[u8]) -> Result<u64, OpCountError> {
    let mut offset = 0usize;
    for c in columns {
        let end = offset
            .checked_add(c.len)
            .filter(|e| *e <= data.len())
            .ok_or(OpCountError::Malformed("column data"))?;
        if c.spec >> 4 == ACTION_COLUMN_ID && c.spec & 0b111 == INTEGER_TYPE {
            let raw = &data[offset..end];
            return if c.spec & DEFLATE_BIT != 0 {
                rle_rows(&inflate(raw)?)
            } else {
                rle_rows(raw)
            };
        }
        offset = end;
    }
    Ok(0) // no action column: no operations
}

/// Rows in a run-length encoded column of unsigned integers: runs of a repeated value
/// (positive count), literal runs (negative count) and null runs (zero, then a count).
fn rle_rows(col: &[u8]) -> Result<u64, OpCountError> {
    let mut r = Reader::new(col);
    let mut rows = 0u64;
    while !r.is_empty() {
        let count = r.sleb()?;
        match count {
            c if c > 0 => {
                r.uleb()?;
                rows = rows.saturating_add(c as u64);
            }
            c if c < 0 => {
                let n = c.unsigned_abs();
                for _ in 0..n {
                    r.uleb()?;
                }
                rows = rows.saturating_add(n);
            }
            _ => rows = rows.saturating_add(r.uleb()?),
        }
    }
    Ok(rows)
}

fn inflate(raw: &[u8]) -> Result<Vec<u8>, OpCountError> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(raw)
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|_| OpCountError::Malformed("deflate"))?;
    if out.len() as u64 > MAX_INFLATED_BYTES {
        return Err(OpCountError::Malformed("compressed data inflates too far"));
    }
    Ok(out)
}

fn skip_bytes(r: &mut Reader<'_>) -> Result<(), OpCountError> {
    let len = r.uleb_usize()?;
    r.take(len).map(|_| ())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos.min(self.bytes.len())..]
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], OpCountError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(OpCountError::Malformed("truncated"))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, OpCountError> {
        Ok(self.take(1)?[0])
    }

    fn uleb(&mut self) -> Result<u64, OpCountError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(OpCountError::Malformed("LEB128 too long"))
    }

    fn uleb_usize(&mut self) -> Result<usize, OpCountError> {
        usize::try_from(self.uleb()?).map_err(|_| OpCountError::Malformed("length"))
    }

    fn sleb(&mut self) -> Result<i64, OpCountError> {
        let mut value = 0i64;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift < 64 {
                value |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
            if shift >= 70 {
                return Err(OpCountError::Malformed("LEB128 too long"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ReadDoc, ROOT};

    /// A document with a text of `n` characters typed in one change, plus a few map keys.
    fn doc_with_text(n: usize) -> AutoCommit {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "type", "household").unwrap();
        let text = doc.put_object(ROOT, "notes", ObjType::Text).unwrap();
        doc.splice_text(&text, 0, 0, &"a".repeat(n)).unwrap();
        doc.commit();
        doc
    }

    fn ops_of(doc: &mut AutoCommit) -> u64 {
        doc.get_changes(&[]).iter().map(|c| c.len() as u64).sum()
    }

    #[test]
    fn change_chunks_count_what_automerge_counts() {
        let mut doc = doc_with_text(1000);
        doc.put(ROOT, "premises", "home").unwrap();
        doc.commit();
        let expected = ops_of(&mut doc);
        let bytes = doc.save_after(&[]); // concatenated change chunks
        assert_eq!(count_ops(&bytes), Ok(expected));
        for c in doc.get_changes(&[]) {
            assert_eq!(count_ops(c.raw_bytes()), Ok(c.len() as u64));
        }
    }

    #[test]
    fn document_chunks_count_what_automerge_counts() {
        let mut doc = doc_with_text(5000);
        let expected = ops_of(&mut doc);
        assert_eq!(count_ops(&doc.save()), Ok(expected));
        // A large document deflates its columns; the count is the same.
        let mut big = AutoCommit::new();
        for i in 0..3000 {
            big.put(ROOT, format!("key{i}"), i as i64).unwrap();
        }
        big.commit();
        let expected = ops_of(&mut big);
        assert_eq!(count_ops(&big.save()), Ok(expected));
        let reloaded = automerge::Automerge::load(&big.save()).unwrap();
        assert_eq!(reloaded.length(ROOT), 3000);
    }

    #[test]
    fn a_small_upload_of_a_million_operations_is_counted_from_its_headers() {
        // One million identical characters: the document's columns deflate to a few KB,
        // and so does the change when sent compressed.
        let mut doc = doc_with_text(1_000_000);
        let saved = doc.save();
        assert!(saved.len() < 16 * 1024, "{} bytes", saved.len());
        assert!(count_ops(&saved).unwrap() >= 1_000_000);
        let mut change = doc.get_changes(&[]).last().unwrap().clone();
        let compressed = change.bytes().into_owned();
        assert!(compressed.len() < 16 * 1024, "{} bytes", compressed.len());
        assert_eq!(compressed[8], 2, "a deflated change chunk");
        assert!(count_ops(&compressed).unwrap() >= 1_000_000);
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        assert!(count_ops(b"not a chunk").is_err());
        let mut doc = doc_with_text(10);
        let bytes = doc.save();
        for cut in 0..bytes.len() {
            let _ = count_ops(&bytes[..cut]);
        }
        let mut flipped = bytes.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = count_ops(&flipped);
            flipped[i] ^= 0xff;
        }
        assert_eq!(count_ops(&[]), Ok(0));
    }
}
