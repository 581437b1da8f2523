//! Cloud-init's NoCloud seed: a small ISO 9660 volume labelled `cidata`
//! holding `user-data`, `meta-data` and, when given, `network-config` and
//! `vendor-data`. The shim builds it in memory (a sealed memfd) and passes
//! it as a read-only disk, so nothing is written to the node.
//!
//! The volume is what `genisoimage -V cidata -R` makes, reduced to one root
//! directory: ISO 9660 names that Linux maps to the right lower-case names
//! even without extensions (`USER-DATA.;1` → `user-data`), and Rock Ridge
//! names (`NM`) for every other reader.

use std::collections::BTreeMap;

/// The volume label cloud-init's NoCloud source looks for.
pub const LABEL: &str = "cidata";

/// Files the directory may hold besides `user-data` and `meta-data`.
pub const OPTIONAL_FILES: [&str; 2] = ["network-config", "vendor-data"];

/// The largest file taken from the directory (cloud-init reads these into
/// memory; a Secret holds at most 1 MiB).
pub const MAX_FILE_BYTES: usize = 16 << 20;

const SECTOR: usize = 2048;
/// System area (16 sectors), the primary volume descriptor, the terminator,
/// the two path tables and the root directory come before the files.
const FIRST_FILE_SECTOR: usize = 21;
const ROOT_SECTOR: usize = 20;

/// The seed's meta-data: the given one (a YAML or JSON mapping), with
/// `instance-id` and `local-hostname` added where it does not set them.
/// Written as JSON, which is YAML too, so no YAML writer is needed.
pub fn meta_data(given: Option<&str>, instance_id: &str, hostname: &str) -> Result<Vec<u8>, String> {
    let mut map: serde_json::Map<String, serde_json::Value> = match given {
        None => serde_json::Map::new(),
        Some(text) if text.trim().is_empty() => serde_json::Map::new(),
        Some(text) => serde_saphyr::from_str(text)
            .map_err(|e| format!("is not a YAML mapping of meta-data keys (e.g. instance-id: my-vm): {e}"))?,
    };
    map.entry("instance-id")
        .or_insert_with(|| serde_json::Value::String(instance_id.to_owned()));
    map.entry("local-hostname")
        .or_insert_with(|| serde_json::Value::String(hostname.to_owned()));
    let mut out = serde_json::to_vec_pretty(&map).map_err(|e| format!("cannot be written as JSON: {e}"))?;
    out.push(b'\n');
    Ok(out)
}

/// An ISO 9660 volume labelled `label` whose root directory holds `files`
/// (lower-case names of letters, digits and `-`, at most 30 bytes: their
/// upper-case ISO 9660 names sort as the lower-case ones do).
/// `unix_time` dates the volume and its files.
pub fn iso9660(label: &str, files: &BTreeMap<String, Vec<u8>>, unix_time: i64) -> Result<Vec<u8>, String> {
    for name in files.keys() {
        let valid = !name.is_empty()
            && name.len() <= 30
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(format!("{name:?} cannot be a seed file name"));
        }
    }
    if label.is_empty() || label.len() > 32 || !label.is_ascii() {
        return Err(format!("{label:?} cannot be a volume label (1 to 32 ASCII characters)"));
    }
    let when = RecordingDate::from_unix(unix_time);

    // Where each file goes.
    let mut extents = Vec::new();
    let mut next = FIRST_FILE_SECTOR;
    for (name, data) in files {
        extents.push((name.as_str(), next, data.len()));
        next += data.len().div_ceil(SECTOR).max(1);
    }
    let total_sectors = next;
    let sectors = u32::try_from(total_sectors).map_err(|_| "the seed is too large".to_owned())?;

    let mut root = Vec::with_capacity(SECTOR);
    // "." carries the System Use Sharing Protocol's marker (SP) and names
    // the extension in use (ER), which is how readers know to look for
    // Rock Ridge entries.
    let mut dot_use = Vec::new();
    dot_use.extend_from_slice(&[b'S', b'P', 7, 1, 0xbe, 0xef, 0]);
    dot_use.extend_from_slice(&posix_entry(0o040555, 2));
    let id = b"RRIP_1991A";
    dot_use.extend_from_slice(&[b'E', b'R', (8 + id.len()) as u8, 1, id.len() as u8, 0, 0, 1]);
    dot_use.extend_from_slice(id);
    root.extend(directory_record(ROOT_SECTOR, SECTOR, true, &[0], &dot_use, &when));
    root.extend(directory_record(
        ROOT_SECTOR,
        SECTOR,
        true,
        &[1],
        &posix_entry(0o040555, 2),
        &when,
    ));
    for (name, sector, length) in &extents {
        let iso_name = format!("{}.;1", name.to_ascii_uppercase());
        let mut system_use = Vec::new();
        // RR (RRIP 1.09): which entries follow: PX (1) and NM (8).
        system_use.extend_from_slice(&[b'R', b'R', 5, 1, 0x09]);
        system_use.extend_from_slice(&posix_entry(0o100444, 1));
        system_use.extend_from_slice(&[b'N', b'M', (5 + name.len()) as u8, 1, 0]);
        system_use.extend_from_slice(name.as_bytes());
        root.extend(directory_record(
            *sector,
            *length,
            false,
            iso_name.as_bytes(),
            &system_use,
            &when,
        ));
    }
    if root.len() > SECTOR {
        return Err("too many seed files for one directory sector".into());
    }

    let mut image = vec![0u8; total_sectors * SECTOR];
    let pvd = primary_volume_descriptor(label, sectors, &when);
    image[16 * SECTOR..17 * SECTOR].copy_from_slice(&pvd);
    let terminator = &mut image[17 * SECTOR..18 * SECTOR];
    terminator[0] = 255;
    terminator[1..6].copy_from_slice(b"CD001");
    terminator[6] = 1;
    // The path tables: the root directory alone, little- then big-endian.
    let path_record = |big_endian: bool| {
        let mut record = vec![1, 0];
        let at = ROOT_SECTOR as u32;
        record.extend_from_slice(&if big_endian { at.to_be_bytes() } else { at.to_le_bytes() });
        record.extend_from_slice(&if big_endian {
            1u16.to_be_bytes()
        } else {
            1u16.to_le_bytes()
        });
        record.extend_from_slice(&[0, 0]);
        record
    };
    image[18 * SECTOR..18 * SECTOR + 10].copy_from_slice(&path_record(false));
    image[19 * SECTOR..19 * SECTOR + 10].copy_from_slice(&path_record(true));
    image[ROOT_SECTOR * SECTOR..ROOT_SECTOR * SECTOR + root.len()].copy_from_slice(&root);
    for ((_, sector, length), data) in extents.iter().zip(files.values()) {
        image[sector * SECTOR..sector * SECTOR + length].copy_from_slice(data);
    }
    Ok(image)
}

/// A Rock Ridge PX entry (RRIP 1.09: mode, links, owner, group).
fn posix_entry(mode: u32, links: u32) -> Vec<u8> {
    let mut entry = vec![b'P', b'X', 36, 1];
    for value in [mode, links, 0, 0] {
        entry.extend_from_slice(&both_endian_u32(value));
    }
    entry
}

fn both_endian_u32(value: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&value.to_le_bytes());
    out[4..].copy_from_slice(&value.to_be_bytes());
    out
}

fn both_endian_u16(value: u16) -> [u8; 4] {
    let mut out = [0u8; 4];
    out[..2].copy_from_slice(&value.to_le_bytes());
    out[2..].copy_from_slice(&value.to_be_bytes());
    out
}

fn directory_record(
    sector: usize,
    length: usize,
    directory: bool,
    name: &[u8],
    system_use: &[u8],
    when: &RecordingDate,
) -> Vec<u8> {
    let mut record = vec![0u8; 33];
    record[2..10].copy_from_slice(&both_endian_u32(sector as u32));
    record[10..18].copy_from_slice(&both_endian_u32(length as u32));
    record[18..25].copy_from_slice(&when.0);
    record[25] = if directory { 2 } else { 0 };
    record[28..32].copy_from_slice(&both_endian_u16(1));
    record[32] = name.len() as u8;
    record.extend_from_slice(name);
    // The name is padded to an even length before the system use area.
    if name.len().is_multiple_of(2) {
        record.push(0);
    }
    record.extend_from_slice(system_use);
    if !record.len().is_multiple_of(2) {
        record.push(0);
    }
    record[0] = record.len() as u8;
    record
}

fn primary_volume_descriptor(label: &str, sectors: u32, when: &RecordingDate) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = 1;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let padded = |field: &mut [u8], text: &str| {
        field.fill(b' ');
        field[..text.len()].copy_from_slice(text.as_bytes());
    };
    padded(&mut d[8..40], "LINUX");
    padded(&mut d[40..72], label);
    d[80..88].copy_from_slice(&both_endian_u32(sectors));
    d[120..124].copy_from_slice(&both_endian_u16(1));
    d[124..128].copy_from_slice(&both_endian_u16(1));
    d[128..132].copy_from_slice(&both_endian_u16(SECTOR as u16));
    d[132..140].copy_from_slice(&both_endian_u32(10));
    d[140..144].copy_from_slice(&18u32.to_le_bytes());
    d[148..152].copy_from_slice(&19u32.to_be_bytes());
    let root = directory_record(ROOT_SECTOR, SECTOR, true, &[0], &[], when);
    d[156..190].copy_from_slice(&root);
    padded(&mut d[190..318], "");
    padded(&mut d[318..446], "");
    padded(&mut d[446..574], "");
    padded(&mut d[574..702], "VIRTKUBE");
    padded(&mut d[702..813], "");
    let stamp = when.long_form();
    d[813..830].copy_from_slice(&stamp);
    d[830..847].copy_from_slice(&stamp);
    // Never expires; effective at once.
    d[847..863].fill(b'0');
    d[864..880].fill(b'0');
    d[881] = 1;
    d
}

/// A date in a directory record: years since 1900, month, day, hour,
/// minute, second, offset from UTC (0).
struct RecordingDate([u8; 7]);

impl RecordingDate {
    fn from_unix(seconds: i64) -> RecordingDate {
        let days = seconds.div_euclid(86_400);
        let of_day = seconds.rem_euclid(86_400);
        let (year, month, day) = virtkube_api::civil::civil_from_days(days);
        let year = (year - 1900).clamp(0, 255) as u8;
        RecordingDate([
            year,
            month as u8,
            day as u8,
            (of_day / 3600) as u8,
            (of_day / 60 % 60) as u8,
            (of_day % 60) as u8,
            0,
        ])
    }

    /// The volume descriptor's form: `YYYYMMDDHHMMSScc` and the offset.
    fn long_form(&self) -> [u8; 17] {
        let [y, mo, d, h, mi, s, _] = self.0;
        let text = format!("{:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00", 1900 + u32::from(y));
        let mut out = [0u8; 17];
        out[..16].copy_from_slice(text.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn seed() -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            ("meta-data".to_owned(), b"{}\n".to_vec()),
            ("user-data".to_owned(), vec![b'u'; 5000]),
            ("network-config".to_owned(), Vec::new()),
        ])
    }

    #[test]
    fn recording_dates_are_civil() {
        assert_eq!(
            &RecordingDate::from_unix(1_763_899_505).long_form()[..14],
            b"20251123120505"
        );
    }

    #[test]
    fn the_volume_is_laid_out_in_whole_sectors_with_each_file_in_its_extent() {
        let image = iso9660(LABEL, &seed(), 0).unwrap();
        // 21 sectors of structure, then meta-data (1), network-config (1, empty), user-data (3).
        assert_eq!(image.len(), 26 * SECTOR);
        assert_eq!(&image[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(&image[16 * SECTOR + 40..16 * SECTOR + 46], b"cidata");
        assert_eq!(&image[16 * SECTOR + 80..16 * SECTOR + 84], &26u32.to_le_bytes());
        assert_eq!(image[17 * SECTOR], 255);
        assert_eq!(&image[21 * SECTOR..21 * SECTOR + 3], b"{}\n");
        assert!(image[23 * SECTOR..23 * SECTOR + 5000].iter().all(|b| *b == b'u'));
        // Every record of the root directory has an even length and fits.
        let root = &image[ROOT_SECTOR * SECTOR..(ROOT_SECTOR + 1) * SECTOR];
        let mut at = 0;
        let mut names = Vec::new();
        while root[at] != 0 {
            let length = usize::from(root[at]);
            assert_eq!(length % 2, 0);
            let name_length = usize::from(root[at + 32]);
            names.push(String::from_utf8_lossy(&root[at + 33..at + 33 + name_length]).into_owned());
            at += length;
        }
        assert_eq!(
            names,
            ["\u{0}", "\u{1}", "META-DATA.;1", "NETWORK-CONFIG.;1", "USER-DATA.;1"]
        );
    }

    #[test]
    fn names_and_labels_outside_the_format_are_refused() {
        for name in ["User-Data", "a/b", "", "x.y", "user_data", &"n".repeat(31)] {
            let files = BTreeMap::from([(name.to_owned(), vec![1])]);
            let message = iso9660(LABEL, &files, 0).unwrap_err();
            assert!(message.contains("cannot be a seed file name"), "{message}");
        }
        assert!(iso9660("", &seed(), 0).is_err());
        assert!(iso9660(&"l".repeat(33), &seed(), 0).is_err());
    }

    #[test]
    fn meta_data_gets_the_pods_identity_unless_it_sets_its_own() {
        let made = meta_data(None, "0b7e-uid", "web-0").unwrap();
        let value: serde_json::Value = serde_json::from_slice(&made).unwrap();
        assert_eq!(value["instance-id"], "0b7e-uid");
        assert_eq!(value["local-hostname"], "web-0");
        let given = "instance-id: fixed\npublic-keys: [ssh-ed25519 AAAA me]\n";
        let value: serde_json::Value =
            serde_json::from_slice(&meta_data(Some(given), "uid", "web-0").unwrap()).unwrap();
        assert_eq!(value["instance-id"], "fixed");
        assert_eq!(value["local-hostname"], "web-0");
        assert_eq!(value["public-keys"][0], "ssh-ed25519 AAAA me");
        let json = r#"{"local-hostname": "mine"}"#;
        let value: serde_json::Value = serde_json::from_slice(&meta_data(Some(json), "uid", "web-0").unwrap()).unwrap();
        assert_eq!(value["local-hostname"], "mine");
        for bad in ["- a list\n", "just text", "a: [unclosed\n"] {
            let message = meta_data(Some(bad), "uid", "h").unwrap_err();
            assert!(message.starts_with("is not a YAML mapping"), "{bad:?}: {message}");
        }
    }
}
