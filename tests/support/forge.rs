//! Forging journal records stack never writes. An event or a checkpoint cannot
//! hold an unsafe name or md5 (`stack::model::name`), so a test that needs a
//! checksum-valid record naming one writes the record with a placeholder, then
//! replaces the placeholder's bytes in the file and re-checksums its frame.

use std::path::Path;

use stack::journal::frame::{FRAME_HEADER_LEN, HEADER_LEN};

/// In the journal at `path`, replace the one string `placeholder` (as bincode
/// writes a string: its length, then its bytes) with `value`, and give its frame
/// the length and checksum that make it valid. Both must be shorter than 251
/// bytes (a length of one byte). Panics unless `placeholder` occurs exactly once.
pub fn forge_journal(path: &Path, placeholder: &str, value: &str) {
    assert!(placeholder.len() < 251 && value.len() < 251);
    let find: Vec<u8> = [&[placeholder.len() as u8], placeholder.as_bytes()].concat();
    let put: Vec<u8> = [&[value.len() as u8], value.as_bytes()].concat();
    let bytes = std::fs::read(path).expect("read journal");
    let mut out = bytes[..HEADER_LEN].to_vec();
    let mut at = HEADER_LEN;
    let mut found = 0;
    while at + FRAME_HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let end = at + FRAME_HEADER_LEN + len;
        if end > bytes.len() {
            break;
        }
        let payload = &bytes[at + FRAME_HEADER_LEN..end];
        let hits: Vec<usize> = (0..payload.len())
            .filter(|&i| payload[i..].starts_with(&find))
            .collect();
        found += hits.len();
        let payload = match hits.first() {
            Some(&i) => [&payload[..i], &put[..], &payload[i + find.len()..]].concat(),
            None => payload.to_vec(),
        };
        let head = (payload.len() as u32).to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&payload);
        out.extend(head);
        out.extend(crc.finalize().to_le_bytes());
        out.extend(payload);
        at = end;
    }
    assert_eq!(found, 1, "{placeholder:?} in the journal's frames");
    out.extend(&bytes[at..]);
    std::fs::write(path, out).expect("write journal");
}
