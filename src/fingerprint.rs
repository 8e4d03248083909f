//! The build fingerprint: the registry hash plus the executable's identity (its ELF build id,
//! or a hash of its bytes when it has none). Computed once per process.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::OnceLock;

use crate::protocol::Fingerprint;
use crate::registry::{Fnv, registry_hash};

/// This process's fingerprint and executable path.
pub fn this_process() -> &'static (Fingerprint, String) {
    static FP: OnceLock<(Fingerprint, String)> = OnceLock::new();
    FP.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        let build = build_identity(&exe).unwrap_or_else(|e| format!("unknown ({e})"));
        (Fingerprint { registry: registry_hash(), build }, exe.display().to_string())
    })
}

/// The ELF build id of `exe` in hex, else a hash of its contents.
pub fn build_identity(exe: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(exe)?;
    if let Some(id) = elf_build_id(&mut file)? {
        return Ok(id.iter().map(|b| format!("{b:02x}")).collect());
    }
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Fnv::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.write(&buf[..n]);
    }
    Ok(format!("content-{:016x}", hasher.0))
}

/// Finds the `NT_GNU_BUILD_ID` note through the program headers of a 64-bit little-endian
/// ELF file. `Ok(None)` for anything else.
fn elf_build_id(file: &mut (impl Read + Seek)) -> std::io::Result<Option<Vec<u8>>> {
    let mut eh = [0u8; 64];
    if file.read_exact(&mut eh).is_err() || eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None);
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as usize;
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes")) as usize;
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36), u16_at(&eh, 0x38));
    if phentsize < 56 || phnum > 4096 {
        return Ok(None);
    }
    let mut ph = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))?;
    file.read_exact(&mut ph)?;
    for p in ph.chunks(phentsize) {
        const PT_NOTE: usize = 4;
        let (offset, size) = (u64_at(p, 8), u64_at(p, 32) as usize);
        if u32_at(p, 0) != PT_NOTE || size > 1 << 16 {
            continue;
        }
        let mut notes = vec![0u8; size];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut notes)?;
        let mut i = 0;
        while i + 12 <= notes.len() {
            let (namesz, descsz, kind) = (u32_at(&notes, i), u32_at(&notes, i + 4), u32_at(&notes, i + 8));
            let name_at = i + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let end = desc_at + descsz.div_ceil(4) * 4;
            if end > notes.len() {
                break;
            }
            const NT_GNU_BUILD_ID: usize = 3;
            if kind == NT_GNU_BUILD_ID && &notes[name_at..name_at + namesz] == b"GNU\0" {
                return Ok(Some(notes[desc_at..desc_at + descsz].to_vec()));
            }
            i = end;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_and_differs_between_binaries() {
        let me = std::env::current_exe().unwrap();
        let a = build_identity(&me).unwrap();
        assert_eq!(a, build_identity(&me).unwrap());
        assert_ne!(a, build_identity(Path::new("/bin/sh")).unwrap());
    }

    #[test]
    fn non_elf_files_fall_back_to_a_content_hash() {
        let p = std::env::temp_dir().join(format!("cman-fp-{}", std::process::id()));
        std::fs::write(&p, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(build_identity(&p).unwrap().starts_with("content-"));
        std::fs::remove_file(p).unwrap();
    }
}
