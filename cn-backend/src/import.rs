//! Bulk import of parent subscriptions from CSV, all or nothing.
//!
//! Format (a header row is required; columns in any order; surrounding spaces are trimmed; lines
//! starting with `#` are comments):
//!
//! ```text
//! supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns
//! imsi-001010000000001,465b5ce8b199b49faa5f0a2ee238a6bc,cd63cb71954a9f4e48a5994e37a02baf,8000,0,5,86400,false,internet;ims
//! ```
//!
//! - `k`, `opc` / `op`: 32 hex digits. Give exactly one of `opc` and `op`; with `op`, OPc is
//!   computed (TS 35.206). Error messages never repeat key material.
//! - `amf`: 4 hex digits. `sqn`: SQN_HE, decimal, or hex with a `0x` prefix (48-bit).
//! - `roaming`: `true|false|yes|no|1|0`. `dnns`: separated by `;` or spaces; empty = any.
//! - Optional column `max_bitrate_kbps`: empty = no cap.
//! - Optional column `require_attestation`: true/false, empty = false.
//!
//! Every row is parsed and validated first, then all rows are inserted in one transaction; the
//! first bad row (syntax, duplicate in the file, SUPI already in the database) is reported with
//! its line number and nothing is committed.

use std::collections::HashMap;
use std::io::Read;

use companion_crypto::aka::Sqn;
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use thiserror::Error;

use crate::model::{Amf, Dnn, NewParent, ParentPolicy, SubscriberKeys, Supi, Timestamp};
use crate::store::{AuditAction, AuditEvent, Store, StoreError, transact};

/// Why an import failed. Nothing was committed.
#[derive(Debug, Error)]
pub enum ImportError {
    /// The header is missing or names unknown/duplicate/missing columns.
    #[error("CSV header: {0}")]
    Header(String),
    /// A row is bad.
    #[error("line {line}: {message}")]
    Row {
        /// 1-based line number in the file.
        line: u64,
        /// What is wrong (never contains key material).
        message: String,
    },
    /// The database failed (not because of a row).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One parsed row.
#[derive(Debug, Clone)]
pub struct ImportRow {
    /// 1-based line number in the file.
    pub line: u64,
    /// The subscriber to add.
    pub parent: NewParent,
}

const REQUIRED: [&str; 8] = [
    "supi",
    "k",
    "amf",
    "sqn",
    "max_children",
    "max_lifetime_s",
    "roaming",
    "dnns",
];
const OPTIONAL: [&str; 4] = ["opc", "op", "max_bitrate_kbps", "require_attestation"];

struct Columns(HashMap<&'static str, usize>);

impl Columns {
    fn from_header(header: &csv::StringRecord) -> Result<Self, ImportError> {
        let mut map = HashMap::new();
        for (i, name) in header.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            let Some(known) = REQUIRED.iter().chain(OPTIONAL.iter()).find(|k| **k == name) else {
                return Err(ImportError::Header(format!("unknown column {name:?}")));
            };
            if map.insert(*known, i).is_some() {
                return Err(ImportError::Header(format!("duplicate column {name:?}")));
            }
        }
        if let Some(missing) = REQUIRED.iter().find(|c| !map.contains_key(*c)) {
            return Err(ImportError::Header(format!("missing column {missing:?}")));
        }
        match (map.contains_key("opc"), map.contains_key("op")) {
            (true, false) | (false, true) => Ok(Self(map)),
            _ => Err(ImportError::Header(
                "exactly one of the columns \"opc\" and \"op\" is required".into(),
            )),
        }
    }

    fn get<'r>(&self, rec: &'r csv::StringRecord, name: &str) -> &'r str {
        self.0
            .get(name)
            .and_then(|&i| rec.get(i))
            .unwrap_or_default()
            .trim()
    }
}

fn parse_bool(name: &str, s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{name}: expected true or false, got {s:?}")),
    }
}

fn parse_sqn(s: &str) -> Result<Sqn, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse::<u64>(),
    }
    .map_err(|_| format!("sqn: expected a decimal or 0x-hex number, got {s:?}"))?;
    Sqn::new(v).map_err(|_| format!("sqn: {s} does not fit in 48 bits"))
}

fn parse_row(cols: &Columns, rec: &csv::StringRecord) -> Result<NewParent, String> {
    let supi = Supi::parse(cols.get(rec, "supi")).map_err(|e| e.to_string())?;
    let k = Key128::from_hex(cols.get(rec, "k")).map_err(|_| "k: expected 32 hex digits")?;
    let opc = if cols.0.contains_key("opc") {
        Key128::from_hex(cols.get(rec, "opc")).map_err(|_| "opc: expected 32 hex digits")?
    } else {
        let op = Key128::from_hex(cols.get(rec, "op")).map_err(|_| "op: expected 32 hex digits")?;
        Milenage::compute_opc(&k, op.expose())
    };
    let mut amf = [0u8; 2];
    hex::decode_to_slice(cols.get(rec, "amf"), &mut amf)
        .map_err(|_| "amf: expected 4 hex digits")?;
    let sqn = parse_sqn(cols.get(rec, "sqn"))?;
    let num = |name: &str| -> Result<u64, String> {
        let s = cols.get(rec, name);
        s.parse::<u64>()
            .map_err(|_| format!("{name}: expected a non-negative integer, got {s:?}"))
    };
    let max_children =
        u32::try_from(num("max_children")?).map_err(|_| "max_children: too large".to_owned())?;
    let max_lifetime_s = num("max_lifetime_s")?;
    let roaming_allowed = parse_bool("roaming", cols.get(rec, "roaming"))?;
    let allowed_dnns = cols
        .get(rec, "dnns")
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|d| !d.is_empty())
        .map(Dnn::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let max_bitrate_kbps = match cols.get(rec, "max_bitrate_kbps") {
        "" => None,
        s => Some(s.parse::<u32>().map_err(|_| {
            format!("max_bitrate_kbps: expected a positive integer or nothing, got {s:?}")
        })?),
    };
    // Optional column; empty or absent = not required.
    let require_attestation = match cols.get(rec, "require_attestation") {
        "" => false,
        s => parse_bool("require_attestation", s)?,
    };
    let policy = ParentPolicy {
        max_children,
        max_lifetime_s,
        roaming_allowed,
        allowed_dnns,
        max_bitrate_kbps,
        require_attestation,
    }
    .validated()
    .map_err(|e| e.to_string())?;
    Ok(NewParent {
        supi,
        keys: SubscriberKeys { k, opc },
        amf: Amf(amf),
        sqn,
        policy,
    })
}

/// Parses and validates a whole CSV file; stops at the first bad row.
pub fn parse_csv<R: Read>(reader: R) -> Result<Vec<ImportRow>, ImportError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        // Comments are skipped below rather than by the reader, which would not count their lines.
        .flexible(true)
        .from_reader(reader);
    let header = rdr
        .headers()
        .map_err(|e| ImportError::Header(e.to_string()))?
        .clone();
    if header.is_empty() {
        return Err(ImportError::Header("empty file".into()));
    }
    let cols = Columns::from_header(&header)?;
    let mut rows = Vec::new();
    let mut seen: HashMap<Supi, u64> = HashMap::new();
    let mut rec = csv::StringRecord::new();
    loop {
        let more = rdr.read_record(&mut rec).map_err(|e| {
            let line = e.position().map_or(0, csv::Position::line);
            ImportError::Row {
                line,
                message: e.to_string(),
            }
        })?;
        if !more {
            break;
        }
        let line = rec.position().map_or(0, csv::Position::line);
        if rec.get(0).is_some_and(|f| f.starts_with('#')) {
            continue;
        }
        if rec.len() != header.len() {
            return Err(ImportError::Row {
                line,
                message: format!("expected {} fields, found {}", header.len(), rec.len()),
            });
        }
        let parent =
            parse_row(&cols, &rec).map_err(|message| ImportError::Row { line, message })?;
        if let Some(first) = seen.insert(parent.supi.clone(), line) {
            return Err(ImportError::Row {
                line,
                message: format!("{} already appears on line {first}", parent.supi),
            });
        }
        rows.push(ImportRow { line, parent });
    }
    Ok(rows)
}

/// Inserts parsed rows in one transaction (each audited as `import`); returns how many.
pub fn import_rows<S: Store + ?Sized>(
    store: &S,
    rows: &[ImportRow],
    actor: &str,
    now: Timestamp,
) -> Result<usize, ImportError> {
    let mut failed: Option<u64> = None;
    let result = transact(store, |tx| {
        for row in rows {
            let audit = AuditEvent {
                at: now,
                actor: actor.to_owned(),
                action: AuditAction::Import,
                supi: row.parent.supi.clone(),
                parent: None,
                device_id: None,
                request_id: None,
                detail: format!("line {}", row.line),
            };
            if let Err(e) = tx
                .insert_parent(&row.parent, now)
                .and_then(|()| tx.append_audit(&audit))
            {
                failed = Some(row.line);
                return Err(e);
            }
        }
        Ok(rows.len())
    });
    match (result, failed) {
        (Ok(n), _) => Ok(n),
        (Err(e @ StoreError::Duplicate(_)), Some(line)) => Err(ImportError::Row {
            line,
            message: e.to_string(),
        }),
        (Err(e), _) => Err(ImportError::Store(e)),
    }
}

/// Parses `reader` and imports every row in one transaction.
pub fn import_csv<S: Store + ?Sized, R: Read>(
    store: &S,
    reader: R,
    actor: &str,
    now: Timestamp,
) -> Result<usize, ImportError> {
    let rows = parse_csv(reader)?;
    import_rows(store, &rows, actor, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "supi,k,op,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n";

    #[test]
    fn parses_op_and_computes_opc() {
        // TS 35.208 test set 1.
        let csv = format!(
            "{HEADER}imsi-001010000000001,465b5ce8b199b49faa5f0a2ee238a6bc,cdc202d5123e20f62b6d676ac72cb318,b9b9,0xff9bb4d0b607,3,3600,yes,Internet; ims\n"
        );
        let rows = parse_csv(csv.as_bytes()).unwrap();
        assert_eq!(rows.len(), 1);
        let p = &rows[0].parent;
        assert_eq!(rows[0].line, 2);
        assert_eq!(
            hex::encode(p.keys.opc.expose()),
            "cd63cb71954a9f4e48a5994e37a02baf"
        );
        assert_eq!(p.amf, Amf([0xb9, 0xb9]));
        assert_eq!(p.sqn.value(), 0xff9b_b4d0_b607);
        assert!(p.policy.roaming_allowed);
        assert_eq!(p.policy.allowed_dnns.len(), 2);
    }

    #[test]
    fn line_numbered_errors_without_secrets() {
        let good = "imsi-001010000000001,465b5ce8b199b49faa5f0a2ee238a6bc,cdc202d5123e20f62b6d676ac72cb318,8000,0,3,3600,no,";
        let bad_k = "imsi-001010000000002,465b5ce8b199b49faa5f0a2ee238a6,cdc202d5123e20f62b6d676ac72cb318,8000,0,3,3600,no,";
        let csv = format!("{HEADER}{good}\n# comment\n{bad_k}\n");
        let err = parse_csv(csv.as_bytes()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("line 4: k:"), "{msg}");
        assert!(!msg.contains("465b5ce8"));

        let dup = format!("{HEADER}{good}\n{good}\n");
        let err = parse_csv(dup.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("line 2"), "{err}");

        let short = format!("{HEADER}imsi-001010000000001,00\n");
        assert!(matches!(
            parse_csv(short.as_bytes()),
            Err(ImportError::Row { line: 2, .. })
        ));
        let zero_life = format!(
            "{HEADER}imsi-001010000000001,465b5ce8b199b49faa5f0a2ee238a6bc,cdc202d5123e20f62b6d676ac72cb318,8000,0,3,0,no,\n"
        );
        assert!(matches!(
            parse_csv(zero_life.as_bytes()),
            Err(ImportError::Row { line: 2, .. })
        ));
    }

    #[test]
    fn header_checks() {
        for h in [
            "supi,k,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n",
            "supi,k,op,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n",
            "supi,k,op,amf,sqn,max_children,max_lifetime_s,roaming,dnns,color\n",
            "supi,k,op,amf,sqn,max_children,max_lifetime_s,roaming\n",
            "",
        ] {
            assert!(
                matches!(parse_csv(h.as_bytes()), Err(ImportError::Header(_))),
                "{h:?}"
            );
        }
    }
}
