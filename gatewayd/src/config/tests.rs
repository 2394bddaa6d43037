//! Unit tests of [`super`].

use super::*;
use crate::batcher::BatcherConfig;

const EXAMPLE: &str = include_str!("../../gatewayd.example.toml");

#[test]
fn no_file_means_defaults_and_they_validate() {
    let cfg = Config::from_toml_str("", "empty").unwrap();
    assert_eq!(cfg, Config::default());
    assert_eq!(cfg.devices.listen.to_string(), "[::]:4433");
    assert_eq!(cfg.metrics.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(cfg.state_dir, Path::new("/var/lib/gatewayd"));
    assert_eq!(cfg.control.socket, Path::new("/run/gatewayd/control.sock"));
    assert_eq!(cfg.batching.batcher(), BatcherConfig::default());
    assert_eq!(
        cfg.database_path(),
        Path::new("/var/lib/gatewayd/gatewayd.db")
    );
}

#[test]
fn example_file_parses_and_matches_defaults_where_it_says_so() {
    let cfg = Config::from_toml_str(EXAMPLE, "gatewayd.example.toml").unwrap();
    // The example sets these two on purpose (a CN to talk to and an admin group); everything
    // else in it is the default value, spelled out.
    let mut expected = Config::default();
    expected.cn.endpoint = Some("cn.operator.example:4434".into());
    expected.control.group = Some("gatewayd".into());
    assert_eq!(cfg, expected);
    assert_eq!(
        cfg.cn.effective_server_name().as_deref(),
        Some("cn.operator.example")
    );
}

#[test]
fn allowed_sources_must_leave_room_for_learned_addresses() {
    let mut cfg = Config::default();
    let half = companion_filter_common::PAIRED_MAX as usize / 2;
    cfg.filter.allowed_sources = (0..half)
        .map(|i| {
            std::net::IpAddr::from([
                0xfd,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                (i >> 8) as u8,
                i as u8,
            ])
        })
        .collect();
    cfg.validate().unwrap();
    cfg.filter.allowed_sources.push("10.0.0.1".parse().unwrap());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("allowed_sources lists 8193"), "{e}");
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let err = Config::from_toml_str("[batching]\nmax_bach = 3\n", "t.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("max_bach"), "{msg}");
    assert!(msg.contains("t.toml"), "{msg}");
    let err = Config::from_toml_str("statedir = \"/x\"\n", "t.toml").unwrap_err();
    assert!(err.to_string().contains("statedir"), "{err}");
}

#[test]
fn bad_values_are_explained() {
    let e = Config::from_toml_str("[devices]\nidle_timeout = \"soon\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("invalid duration"), "{e}");
    let e = Config::from_toml_str("[batching]\nmax_batch = 0\n", "t").unwrap_err();
    assert!(e.to_string().contains("[batching]"), "{e}");
    let e = Config::from_toml_str("[cn]\nendpoint = \"nohost\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("host:port"), "{e}");
    let e = Config::from_toml_str("[pairing]\nwindow = \"2h\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("max_window"), "{e}");
    let e = Config::from_toml_str("[devices]\nlisten = \"localhost\"\n", "t").unwrap_err();
    assert!(e.to_string().contains("listen"), "{e}");
}

#[test]
fn env_overrides() {
    let mut cfg = Config::default();
    cfg.apply_env_from(|k| match k {
        "GATEWAYD_DEVICE_LISTEN" => Some("127.0.0.1:0".into()),
        "GATEWAYD_STATE_DIR" => Some("/tmp/gw".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(cfg.devices.listen.to_string(), "127.0.0.1:0");
    assert_eq!(cfg.state_dir, Path::new("/tmp/gw"));
    let e = cfg
        .apply_env_from(|k| (k == "GATEWAYD_METRICS_LISTEN").then(|| "nope".into()))
        .unwrap_err();
    assert!(e.to_string().contains("GATEWAYD_METRICS_LISTEN"), "{e}");
}

#[test]
fn endpoints_list_and_its_errors() {
    let cfg = Config::from_toml_str(
        "[cn]\nendpoints = [\"cn-a.example:4434\", \"[2001:db8::2]:4434\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(
        cfg.cn.endpoint_list(),
        vec!["cn-a.example:4434".to_string(), "[2001:db8::2]:4434".into()]
    );
    assert!(cfg.cn.configured());
    assert_eq!(cfg.cn.server_name_for("cn-a.example:4434"), "cn-a.example");
    assert_eq!(cfg.cn.server_name_for("[2001:db8::2]:4434"), "2001:db8::2");
    // `endpoint` is a one-element list.
    let one = Config::from_toml_str("[cn]\nendpoint = \"cn.example:4434\"\n", "t").unwrap();
    assert_eq!(one.cn.endpoint_list(), vec!["cn.example:4434".to_string()]);
    assert!(!Config::default().cn.configured());
    for (toml, want) in [
        (
            "endpoint = \"a:1\"\nendpoints = [\"b:2\"]",
            "both endpoint and endpoints",
        ),
        (
            "endpoints = [\"a:1\", \"nohost\"]",
            "\"nohost\" must be host:port",
        ),
        ("endpoints = [\"a:0\"]", "must be host:port"),
        ("endpoints = [\"a:1\", \"A:1\"]", "twice"),
        (
            "endpoints = [\"a:1\"]\nserver_name = \"\"",
            "server_name must not be empty",
        ),
    ] {
        let e = Config::from_toml_str(&format!("[cn]\n{toml}\n"), "t").unwrap_err();
        assert!(e.to_string().contains(want), "{toml}: {e}");
    }
    let many: Vec<String> = (1..=17).map(|i| format!("\"cn{i}:4434\"")).collect();
    let e = Config::from_toml_str(&format!("[cn]\nendpoints = [{}]\n", many.join(",")), "t")
        .unwrap_err();
    assert!(e.to_string().contains("at most 16"), "{e}");
}

#[test]
fn server_name_from_endpoint() {
    let mut cn = CnConfig {
        endpoint: Some("[2001:db8::1]:4434".into()),
        ..CnConfig::default()
    };
    assert_eq!(cn.effective_server_name().as_deref(), Some("2001:db8::1"));
    cn.server_name = Some("cn.example".into());
    assert_eq!(cn.effective_server_name().as_deref(), Some("cn.example"));
}

#[test]
fn owner_settings_fill_what_is_missing() {
    let c = CredentialsConfig {
        dnns: vec!["iot".into()],
        ..CredentialsConfig::default()
    };
    let p = c.fill_params(companion_proto::msg::Params {
        lifetime_s: Some(60),
        ..Default::default()
    });
    assert_eq!(p.lifetime_s, Some(60));
    assert_eq!(p.roaming, Some(false));
    assert_eq!(p.dnns, Some(vec!["iot".to_string()]));
    assert_eq!(p.max_bitrate_kbps, None);
}

#[test]
fn device_parameters_only_narrow_the_owner_settings() {
    use companion_proto::msg::Params;
    let owner = CredentialsConfig {
        default_lifetime: Duration::from_secs(86_400),
        roaming: false,
        dnns: vec!["iot".into(), "ims".into()],
        max_bitrate_kbps: Some(256),
        ..CredentialsConfig::default()
    };
    let greedy = owner.fill_params(Params {
        lifetime_s: Some(365 * 86_400),
        roaming: Some(true),
        dnns: Some(vec!["internet".into(), "iot".into()]),
        max_bitrate_kbps: Some(1_000_000),
    });
    assert_eq!(greedy.lifetime_s, Some(86_400));
    assert_eq!(greedy.roaming, Some(false));
    assert_eq!(greedy.dnns, Some(vec!["iot".to_string()]));
    assert_eq!(greedy.max_bitrate_kbps, Some(256));
    // Only DNNs the owner does not allow: the owner's list, never the device's.
    let other = owner.fill_params(Params {
        dnns: Some(vec!["internet".into()]),
        ..Params::default()
    });
    assert_eq!(other.dnns, Some(vec!["iot".to_string(), "ims".to_string()]));
    // Narrower requests are kept.
    let modest = owner.fill_params(Params {
        lifetime_s: Some(3600),
        roaming: Some(false),
        dnns: Some(vec!["ims".into()]),
        max_bitrate_kbps: Some(64),
    });
    assert_eq!(modest.lifetime_s, Some(3600));
    assert_eq!(modest.dnns, Some(vec!["ims".to_string()]));
    assert_eq!(modest.max_bitrate_kbps, Some(64));
    // An owner who allows roaming lets a device decline it.
    let roaming_owner = CredentialsConfig {
        roaming: true,
        ..CredentialsConfig::default()
    };
    let declines = roaming_owner.fill_params(Params {
        roaming: Some(false),
        ..Params::default()
    });
    assert_eq!(declines.roaming, Some(false));
    assert_eq!(
        roaming_owner.fill_params(Params::default()).roaming,
        Some(true)
    );
}

#[test]
fn serialises_back_to_an_equal_config() {
    let cfg = Config::default();
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(Config::from_toml_str(&text, "t").unwrap(), cfg);
}
