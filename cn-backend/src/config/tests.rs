//! Unit tests of the configuration: defaults, the template, parsing and validation.

use super::*;

#[test]
fn template_parses_to_defaults() {
    let d = Settings::default();
    let parsed: Settings = toml::from_str(&d.to_toml()).unwrap();
    parsed.validate().unwrap();
    assert_eq!(parsed.listen, d.listen);
    assert_eq!(parsed.imsi_start, 900_000_000);
    assert_eq!(parsed.max_batch_items, 256);
    assert_eq!(parsed.server_names, d.server_names);
}

#[test]
fn store_url_round_trips_and_later_keys_stay_top_level() {
    let mut d = Settings::default();
    assert!(
        toml::from_str::<Settings>(&d.to_toml())
            .unwrap()
            .store
            .url
            .is_empty()
    );
    d.store.url = "postgres://cn@/cn?host=/run/postgresql".into();
    let text = d.to_toml() + "\nmax_connections = 5\n";
    let parsed: Settings = toml::from_str(&text).unwrap();
    assert_eq!(parsed.store.url, d.store.url);
    assert_eq!(parsed.max_connections, 5);
    // The [store] table form reads the same.
    let parsed: Settings =
        toml::from_str("mcc = \"001\"\n[store]\nurl = \"postgres://a@/b?host=/c\"\n").unwrap();
    assert_eq!(parsed.store.url, "postgres://a@/b?host=/c");
}

#[test]
fn sync_open5gs_table_parses_with_defaults_and_is_validated() {
    let text = Settings::default().to_toml()
        + "\n[sync.open5gs]\nuri = \"mongodb://127.0.0.1:27017\"\nsd = \"00000A\"\n";
    let s: Settings = toml::from_str(&text).unwrap();
    s.validate().unwrap();
    let o5 = s.sync.open5gs.unwrap();
    let mut want = Open5gsSettings::with_uri("mongodb://127.0.0.1:27017");
    want.sd = "00000A".into();
    assert_eq!(o5, want);
    assert_eq!(o5.database, "open5gs");
    assert_eq!(o5.collection, "subscribers");
    assert_eq!(o5.default_dnns, ["internet"]);
    assert_eq!(o5.retry_max().unwrap(), Duration::from_secs(30));
    assert!(Settings::default().sync.open5gs.is_none());
    for bad in [
        "uri = \"http://x\"",
        "uri = \"mongodb://x\"\nsd = \"12\"",
        "uri = \"mongodb://x\"\nsession_type = 4",
        "uri = \"mongodb://x\"\ndefault_dnns = []",
        "uri = \"mongodb://x\"\nretry_max = \"soon\"",
    ] {
        let s: Settings = toml::from_str(&format!("[sync.open5gs]\n{bad}\n")).unwrap();
        assert!(
            matches!(s.validate(), Err(ConfigError::Invalid(_))),
            "{bad}"
        );
    }
}

#[test]
fn bad_values_are_reported() {
    let s: Settings = toml::from_str("max_lifetime = \"soon\"").unwrap();
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("max_lifetime")
    );
    let s: Settings = toml::from_str("imsi_count = 0").unwrap();
    assert!(s.validate().is_err());
    assert!(toml::from_str::<Settings>("bogus = 1").is_err());
}
