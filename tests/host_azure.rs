//! The `azure` fence method against a stand-in for the instance metadata
//! service, the Microsoft identity platform and Azure Resource Manager
//! (tests/support/azure_standin.py, which follows their published
//! contracts and records every request it serves). The "VM" a power-off
//! stops is a real `sleep` process that the stand-in kills.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hadb::run::fence::azure::{AzureError, AzureFence, PowerState};
use serde_json::Value;

/// A running stand-in; killed, with its directory removed, when dropped.
struct StandIn {
    child: Child,
    dir: PathBuf,
    imds: u16,
    arm: u16,
    ca: PathBuf,
    /// The peer "VM": a process the stand-in's power-off kills.
    vm_process: Option<Child>,
}

fn dir_for(test: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/hadb-azure-{test}-{}", std::process::id()))
}

impl StandIn {
    /// Starts the stand-in with `args`; `{dir}` in them is its directory.
    /// With `vm_process`, VM hadb02 is a `sleep` whose pid file it kills.
    fn start(test: &str, vm_process: bool, args: &[&str]) -> StandIn {
        common::require("python3", "python3");
        common::require("openssl", "openssl");
        // The directory may hold files the test made for the stand-in;
        // only what the stand-in itself writes is cleared.
        let dir = dir_for(test);
        std::fs::create_dir_all(&dir).unwrap();
        for stale in ["ready.json", "log.jsonl"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let mut argv: Vec<String> = vec![
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/azure_standin.py"
            )
            .into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        let sleeper = vm_process.then(|| {
            let child = Command::new("sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let pidfile = dir.join("hadb02.pid");
            std::fs::write(&pidfile, child.id().to_string()).unwrap();
            argv.push("--vm".into());
            argv.push(format!("hadb02,pidfile={}", pidfile.display()));
            child
        });
        argv.extend(
            args.iter()
                .map(|a| a.replace("{dir}", &dir.display().to_string())),
        );
        let child = Command::new("python3")
            .args(&argv)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = StandIn {
            child,
            dir,
            imds: 0,
            arm: 0,
            ca: PathBuf::new(),
            vm_process: sleeper,
        };
        let ready = s.dir.join("ready.json");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: Value = serde_json::from_str(&text).unwrap();
                s.imds = v["imds"].as_u64().unwrap() as u16;
                s.arm = v["arm"].as_u64().unwrap() as u16;
                s.ca = PathBuf::from(v["ca"].as_str().unwrap());
                return s;
            }
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("the stand-in exited before it was ready: {status}");
            }
            assert!(Instant::now() < end, "the stand-in is not ready after 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fence of VM `vm` (the peer hadb02's azure_vm) with `azure` added
    /// to the `[fencing.azure]` table that points at this stand-in.
    fn fence(&self, vm: &str, timeout: &str, azure: &str) -> Result<AzureFence, AzureError> {
        let text = format!(
            r#"
cluster = "t"
node = "hadb01"
[nodes.hadb01]
address = "127.0.0.1"
[nodes.hadb02]
address = "127.0.0.2"
azure_vm = "{vm}"
[volume]
device = "/dev/null"
[fencing.azure]
metadata_endpoint = "http://127.0.0.1:{imds}"
login_endpoint = "https://127.0.0.1:{arm}"
management_endpoint = "https://127.0.0.1:{arm}/"
ca_file = "{ca}"
power_timeout = "{timeout}"
{azure}
"#,
            imds = self.imds,
            arm = self.arm,
            ca = self.ca.display(),
        );
        let cfg = hadb::config::parse(Path::new("/tmp/hadb-azure.toml"), &text, None, "hadb01")
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        AzureFence::new(cfg.fencing.azure.as_ref().unwrap(), cfg.azure_vm("hadb02"))
    }

    fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Requests served, as "server METHOD path-without-query status".
    fn requests(&self) -> Vec<String> {
        self.log()
            .iter()
            .filter(|e| e.get("server").is_some())
            .map(|e| {
                let path = e["path"].as_str().unwrap();
                format!(
                    "{} {} {} {}",
                    e["server"].as_str().unwrap(),
                    e["method"].as_str().unwrap(),
                    path.split('?').next().unwrap(),
                    e["status"]
                )
            })
            .collect()
    }

    fn count(&self, needle: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains(needle))
            .count()
    }

    /// Whether the VM's process has ended (and how), waiting up to 2s for
    /// the kill to land.
    fn vm_process_ended(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.vm_process.as_mut().unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A file only root may read, in the stand-in's directory.
    fn private_file(&self, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(c) = self.vm_process.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn killed(status: Option<std::process::ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.and_then(|s| s.signal()) == Some(9)
}

#[test]
fn power_off_by_managed_identity_ends_the_vm_and_waits_for_stopped() {
    let mut s = StandIn::start("mi-off", true, &["--op-seconds", "1"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    assert!(
        s.vm_process_ended().is_none(),
        "nothing happens before asked"
    );
    let started = Instant::now();
    let state = fence.power_off().unwrap();
    eprintln!("power_off took {:?}", started.elapsed());
    assert_eq!(state, PowerState::Stopped);
    assert!(killed(s.vm_process_ended()), "the VM's process was killed");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the operation runs a second; a fence that returns sooner did not wait for it"
    );
    let log = s.log();
    let post = log
        .iter()
        .find(|e| e["method"] == "POST")
        .expect("a POST was sent");
    let path = post["path"].as_str().unwrap();
    assert!(
        path.contains("/virtualMachines/hadb02/powerOff?") && path.contains("skipShutdown=true"),
        "{path}"
    );
    assert!(path.contains("resourceGroups/hadb-rg"), "{path}");
    assert_eq!(
        s.count("imds GET /metadata/instance/compute 200"),
        1,
        "subscription and resource group come from the instance metadata: {:#?}",
        s.requests()
    );
    assert!(s.count("operations/") >= 1, "the operation was followed");
    // The state after the operation is read from the instance view.
    let last = s.requests().last().unwrap().clone();
    assert!(last.contains("/instanceView 200"), "{last}");
    // Once more: the token and the location are cached.
    assert_eq!(fence.power_state().unwrap(), PowerState::Stopped);
    assert_eq!(s.count("/metadata/identity/oauth2/token 200"), 1);
    assert_eq!(s.count("/metadata/instance/compute"), 1);
    // Powering off a stopped VM asks nothing of Azure.
    let posts = s.count("POST");
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    assert_eq!(s.count("POST"), posts);
}

#[test]
fn power_off_by_service_principal_secret_without_the_metadata_service() {
    let mut s = StandIn::start(
        "sp-off",
        true,
        &[
            "--op-seconds",
            "1",
            "--sp",
            "app-1=s3cret-value",
            "--location-only",
        ],
    );
    let secret = s.private_file("secret", b"s3cret-value\n", 0o600);
    let fence = s
        .fence(
            "hadb02",
            "30s",
            &format!(
                "auth = \"service-principal\"\ntenant_id = \"hadb-tenant\"\nclient_id = \"app-1\"\nclient_secret_file = \"{}\"\nsubscription_id = \"00000000-0000-0000-0000-0000000000aa\"\nresource_group = \"hadb-rg\"",
                secret.display()
            ),
        )
        .unwrap();
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    assert!(killed(s.vm_process_ended()));
    assert_eq!(s.count("imds "), 0, "{:#?}", s.requests());
    assert_eq!(s.count("arm POST /hadb-tenant/oauth2/v2.0/token 200"), 1);
    // No Azure-AsyncOperation: the Location URL is followed (202 while
    // the operation runs, then 200).
    assert!(s.count("operations/") >= 1, "{:#?}", s.requests());
    let principals: Vec<Value> = s
        .log()
        .iter()
        .filter(|e| e["method"] == "POST" && e["status"] == 202)
        .map(|e| e["principal"].clone())
        .collect();
    assert_eq!(principals, vec![Value::from("app-1")]);
}

#[test]
fn a_wrong_secret_is_refused_clearly_and_changes_nothing() {
    let mut s = StandIn::start("sp-wrong", true, &["--sp", "app-1=right"]);
    let sp = |path: &Path| {
        format!(
            "auth = \"service-principal\"\ntenant_id = \"hadb-tenant\"\nclient_id = \"app-1\"\nclient_secret_file = \"{}\"",
            path.display()
        )
    };
    let wrong = s.private_file("wrong", b"wrong", 0o600);
    let fence = s.fence("hadb02", "30s", &sp(&wrong)).unwrap();
    let err = fence.power_off().unwrap_err();
    assert!(
        matches!(err, AzureError::LoginRefused { status: 401, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("invalid_client"), "{text}");
    assert!(text.contains("service principal app-1"), "{text}");
    assert!(text.contains("secret"), "{text}");
    assert_eq!(
        s.count("POST /subscriptions"),
        0,
        "nothing was asked of ARM"
    );
    assert!(s.vm_process_ended().is_none(), "the VM still runs");

    let open = s.private_file("open", b"right", 0o644);
    let err = s.fence("hadb02", "30s", &sp(&open)).err().unwrap();
    assert!(
        matches!(
            err,
            AzureError::Secret(hadb::run::secret::SecretError::Mode { mode: 0o644, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");

    // Mode 0600, but another account's file: that account could have put
    // its own secret there.
    let theirs = s.private_file("theirs", b"right", 0o600);
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = s.fence("hadb02", "30s", &sp(&theirs)).err().unwrap();
    assert!(
        matches!(
            err,
            AzureError::Secret(hadb::run::secret::SecretError::Owner { uid: 65534, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chown root:root"), "{err}");
    assert!(s.vm_process_ended().is_none(), "the VM still runs");
}

#[test]
fn a_read_only_identity_gets_a_message_naming_the_role() {
    let mut s = StandIn::start("forbidden", true, &["--read-only", "msi"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let err = fence.power_off().unwrap_err();
    assert!(matches!(err, AzureError::Forbidden { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("a role with Microsoft.Compute/virtualMachines/powerOff/action"),
        "{text}"
    );
    assert!(
        text.contains("power off VM hadb02 in resource group hadb-rg"),
        "{text}"
    );
    assert!(text.contains("403 AuthorizationFailed"), "{text}");
    assert!(s.vm_process_ended().is_none(), "the VM still runs");
    assert_eq!(fence.power_state().unwrap(), PowerState::Running);
}

#[test]
fn an_unknown_vm_is_not_found() {
    let s = StandIn::start("not-found", false, &["--vm", "hadb02"]);
    let fence = s.fence("hadb-nope", "30s", "").unwrap();
    let err = fence.power_off().unwrap_err();
    assert!(matches!(err, AzureError::NotFound { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("VM hadb-nope not found in resource group hadb-rg"),
        "{text}"
    );
    assert!(text.contains("ResourceNotFound"), "{text}");
    assert_eq!(s.count("POST"), 0);
    // A wrong resource group is reported as such.
    let fence = s
        .fence(
            "hadb02",
            "30s",
            "resource_group = \"other-rg\"\nsubscription_id = \"00000000-0000-0000-0000-0000000000aa\"",
        )
        .unwrap();
    let err = fence.test().unwrap_err();
    assert!(err.to_string().contains("ResourceGroupNotFound"), "{err}");
}

#[test]
fn throttling_waits_as_long_as_retry_after_says() {
    let mut s = StandIn::start(
        "throttle",
        true,
        &[
            "--op-seconds",
            "1",
            "--throttle",
            "2",
            "--throttle-retry-after",
            "2",
        ],
    );
    let fence = s.fence("hadb02", "30s", "").unwrap();
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    assert!(killed(s.vm_process_ended()));
    let arm: Vec<Value> = s
        .log()
        .into_iter()
        .filter(|e| e["server"] == "arm")
        .collect();
    let throttled: Vec<usize> = (0..arm.len())
        .filter(|&i| arm[i]["status"] == 429)
        .collect();
    assert_eq!(throttled.len(), 2, "{arm:#?}");
    for i in throttled {
        let gap = arm[i + 1]["t"].as_f64().unwrap() - arm[i]["t"].as_f64().unwrap();
        assert!(
            gap >= 2.0,
            "the request after a 429 came {gap:.3}s later; Retry-After said 2"
        );
        eprintln!("request after a 429 came {gap:.3}s later");
    }
}

/// The fence called off (the peer heard again) while the token and the
/// instance view were fetched: the power-off is never sent.
#[test]
fn a_fence_called_off_before_the_power_off_sends_nothing() {
    let mut s = StandIn::start("calledoff", true, &["--op-seconds", "1"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let err = fence
        .power_off_unless(&|| Some("the peer is heard again"))
        .unwrap_err();
    assert!(matches!(err, AzureError::Abandoned(_)), "{err}");
    assert!(err.to_string().contains("not sent"), "{err}");
    assert_eq!(s.count("POST"), 0, "{:#?}", s.requests());
    assert!(s.vm_process_ended().is_none(), "the VM still runs");
    assert_eq!(fence.power_state().unwrap(), PowerState::Running);
}

/// A role scoped to the VM may power it off but not follow the operation
/// (403 on the poll): the fence still counts, on the instance view.
#[test]
fn a_power_off_that_cannot_be_followed_is_confirmed_by_the_instance_view() {
    let mut s = StandIn::start("opforbid", true, &["--op-seconds", "1", "--op-forbidden"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let state = fence.power_off().unwrap();
    assert_eq!(state, PowerState::Stopped);
    assert!(killed(s.vm_process_ended()), "the VM's process was killed");
    assert!(
        s.count("operations/") >= 1
            && s.requests()
                .iter()
                .any(|r| r.contains("operations/") && r.ends_with(" 403")),
        "the poll was refused: {:#?}",
        s.requests()
    );
    let last = s.requests().last().unwrap().clone();
    assert!(last.contains("/instanceView 200"), "{last}");
}

#[test]
fn an_operation_that_never_ends_times_out_within_power_timeout() {
    let mut s = StandIn::start("never", true, &["--op-never"]);
    let fence = s.fence("hadb02", "3s", "").unwrap();
    let started = Instant::now();
    let err = fence.power_off().unwrap_err();
    let took = started.elapsed();
    eprintln!("timed out after {took:?}");
    assert!(matches!(err, AzureError::Timeout { .. }), "{err}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(5),
        "gave up after {took:?}; power_timeout is 3s"
    );
    let text = err.to_string();
    assert!(
        text.contains("not confirmed stopped or deallocated within 3s"),
        "{text}"
    );
    assert!(text.contains("accepted"), "{text}");
    assert!(s.vm_process_ended().is_none());
    assert_eq!(fence.power_state().unwrap(), PowerState::Stopping);
}

#[test]
fn test_reads_the_instance_view_and_powers_nothing_off() {
    let mut s = StandIn::start("test", true, &[]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    assert_eq!(fence.test().unwrap(), PowerState::Running);
    assert_eq!(s.count("POST"), 0, "{:#?}", s.requests());
    assert_eq!(s.count("/metadata/identity/oauth2/token 200"), 1);
    assert_eq!(s.count("/hadb02/instanceView 200"), 1);
    assert!(s.vm_process_ended().is_none(), "the VM still runs");
}

#[test]
fn start_brings_a_stopped_vm_back_to_running() {
    let s = StandIn::start(
        "start",
        false,
        &[
            "--vm",
            "hadb02,state=stopped,on-cmd=touch {dir}/started",
            "--op-seconds",
            "1",
        ],
    );
    let fence = s.fence("hadb02", "30s", "").unwrap();
    assert_eq!(fence.power_state().unwrap(), PowerState::Stopped);
    assert_eq!(fence.start().unwrap(), PowerState::Running);
    assert!(s.dir.join("started").exists(), "the start command ran");
    assert_eq!(s.count("POST /subscriptions"), 1);
    assert!(s.requests().iter().any(|r| r.contains("/hadb02/start 202")));
    // And back off again.
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
}

#[test]
fn a_vm_without_a_managed_identity_says_so() {
    let s = StandIn::start(
        "no-identity",
        false,
        &["--vm", "hadb02", "--managed-identity", "none"],
    );
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let err = fence.test().unwrap_err();
    assert!(matches!(err, AzureError::NoManagedIdentity { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("Identity not found"), "{text}");
    assert!(text.contains("service-principal"), "{text}");
}

#[test]
fn the_fence_waits_for_the_instance_view_not_just_the_operation() {
    let mut s = StandIn::start("view-lag", true, &["--op-seconds", "1", "--view-lag", "2"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let started = Instant::now();
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    // The operation ends a second after the POST, the view says stopped
    // two seconds later: only then may the fence count.
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "returned after {:?}",
        started.elapsed()
    );
    let log = s.log();
    let at = |pred: &dyn Fn(&Value) -> bool| {
        log.iter()
            .filter(|e| pred(e))
            .map(|e| e["t"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let settled = at(&|e| e["event"] == "instance view stopped");
    let views = at(&|e| {
        e["path"]
            .as_str()
            .is_some_and(|p| p.contains("/instanceView"))
    });
    assert_eq!(settled.len(), 1, "{log:#?}");
    assert!(
        views.iter().filter(|&&t| t < settled[0]).count() >= 2,
        "it kept reading the instance view while Azure's operation had ended but the view said stopping: {log:#?}"
    );
    assert!(killed(s.vm_process_ended()));
}

#[test]
fn a_failed_operation_is_a_failed_fence() {
    let mut s = StandIn::start("op-fail", true, &["--op-fail", "--op-seconds", "1"]);
    let fence = s.fence("hadb02", "30s", "").unwrap();
    let err = fence.power_off().unwrap_err();
    assert!(matches!(err, AzureError::OperationFailed { .. }), "{err}");
    assert!(err.to_string().contains("InternalExecutionError"), "{err}");
    assert!(s.vm_process_ended().is_none());
}

#[test]
fn a_service_principal_certificate_signs_its_own_assertion() {
    common::require("openssl", "openssl");
    let dir = dir_for("cert");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert) = (dir.join("sp.key"), dir.join("sp.crt"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=hadb-fence", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = StandIn::start(
        "cert",
        false,
        &["--vm", "hadb02", "--sp-cert", "app-2={dir}/sp.crt"],
    );
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&key).unwrap());
    let both = s.private_file("sp.pem", &pem, 0o600);
    let azure = |path: &Path| {
        format!(
            "auth = \"service-principal\"\ntenant_id = \"hadb-tenant\"\nclient_id = \"app-2\"\nclient_certificate_file = \"{}\"",
            path.display()
        )
    };
    let fence = s.fence("hadb02", "30s", &azure(&both)).unwrap();
    assert_eq!(fence.test().unwrap(), PowerState::Running);
    assert_eq!(s.count("arm POST /hadb-tenant/oauth2/v2.0/token 200"), 1);

    // Another key with the same certificate: the signature does not verify.
    let other = dir.join("other.key");
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut pem = std::fs::read(&cert).unwrap();
    pem.extend(std::fs::read(&other).unwrap());
    let forged = s.private_file("forged.pem", &pem, 0o600);
    let err = s
        .fence("hadb02", "30s", &azure(&forged))
        .unwrap()
        .test()
        .unwrap_err();
    assert!(
        matches!(err, AzureError::LoginRefused { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("signature"), "{err}");
}

/// The whole path in real daemons: the primary freezes (alive, silent, as
/// behind a partition), its secondary fences it through the stand-in,
/// whose power-off kills the frozen daemon, and only then takes over.
#[test]
fn a_frozen_primary_is_powered_off_through_azure_before_the_secondary_takes_over() {
    let s = StandIn::start(
        "daemons",
        false,
        &[
            "--vm",
            "a,pidfile={dir}/a.pid",
            "--vm",
            "b",
            "--op-seconds",
            "1",
        ],
    );
    let mut p = common::Pair::new("azfence-pair", "sync", 16 << 20);
    for n in 0..2 {
        let text = p.config_text(n, "sync").replace(
            "[manager]\nmaintenance = true\n",
            &format!(
                r#"[fencing]
methods = ["azure"]
fence_delay = "2s"
[fencing.azure]
metadata_endpoint = "http://127.0.0.1:{imds}"
login_endpoint = "https://127.0.0.1:{arm}"
management_endpoint = "https://127.0.0.1:{arm}"
ca_file = "{ca}"
power_timeout = "30s"
"#,
                imds = s.imds,
                arm = s.arm,
                ca = s.ca.display()
            ),
        );
        assert!(text.contains("methods = [\"azure\"]"), "{text}");
        std::fs::write(p.config(n), text).unwrap();
    }
    p.start(0);
    p.start(1);
    p.wait(0, "peer connected", |st| {
        st.is_some_and(|st| !st["volume"]["peer"].is_null())
    });
    p.primary(0);
    p.wait_in_sync(0);
    let pid = p.procs[0].as_ref().unwrap().id();
    std::fs::write(s.dir.join("a.pid"), pid.to_string()).unwrap();
    common::run(Command::new("kill").args(["-STOP", &pid.to_string()]));
    p.wait(1, "primary", |st| {
        st.is_some_and(|st| st["volume"]["role"] == "primary")
    });
    let a = p.procs[0].as_mut().unwrap().try_wait().unwrap();
    assert!(
        killed(a),
        "the frozen primary was killed by the power-off: {a:?}"
    );
    let posts: Vec<String> = s
        .requests()
        .into_iter()
        .filter(|r| r.contains("POST /subscriptions"))
        .collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert!(
        posts[0].contains("/virtualMachines/a/powerOff"),
        "{posts:?}"
    );
    let log = p.log(1);
    let confirmed = log
        .find("fence confirmed")
        .unwrap_or_else(|| panic!("b never logged the confirmation:\n{log}"));
    let promoted = log
        .find("volume: promoted to primary")
        .unwrap_or_else(|| panic!("b never promoted:\n{log}"));
    assert!(
        confirmed < promoted,
        "promoted before the fence was confirmed:\n{log}"
    );
    // The operator starts the fenced VM again (unfence) through the same
    // method: Azure's start, followed until the VM runs.
    let out = p.hadb(1, &["fence", "unfence", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("a is running again (azure)"), "{text}");
    assert!(
        s.requests()
            .iter()
            .any(|r| r.contains("POST /subscriptions") && r.contains("/virtualMachines/a/start")),
        "{:#?}",
        s.requests()
    );
    let wrong = p.hadb(1, &["fence", "unfence", "b"]);
    assert!(!wrong.status.success(), "unfenced itself");
}

/// The fence race of a cut network: both nodes lost each other, and both
/// fence. The one whose power-off Azure accepted first wins; the other,
/// still running while that power-off completes (seconds, tens of seconds
/// on Azure), must not power the winner off in turn — the double fence
/// the two-VM lab saw on `image/lab cut`, which left both VMs off.
#[test]
fn a_node_being_powered_off_does_not_fence_its_peer_back() {
    // hadb02 (the loser) is a process the stand-in ends; hadb01 too, so a
    // power-off of the winner would show as its process ending.
    let winner = Command::new("sleep")
        .arg("1000")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let dir = dir_for("race");
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("hadb01.pid");
    std::fs::write(&pidfile, winner.id().to_string()).unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut winner = Reap(winner);
    let vm01 = format!("hadb01,pidfile={}", pidfile.display());
    let mut s = StandIn::start("race", true, &["--op-seconds", "4", "--vm", &vm01]);
    // hadb01 fences hadb02 (it looks at its own VM hadb01 first) ...
    let a = s.fence("hadb02", "30s", "").unwrap().with_own_vm("hadb01");
    // ... and hadb02, a moment later, fences hadb01, looking at hadb02.
    let b = s.fence("hadb01", "30s", "").unwrap().with_own_vm("hadb02");
    let first = std::thread::spawn(move || a.power_off());
    let accepted = Instant::now() + Duration::from_secs(20);
    while s.count("POST /subscriptions/") == 0 {
        assert!(
            Instant::now() < accepted,
            "no power-off of hadb02 was asked for"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = b.power_off().unwrap_err();
    assert!(matches!(err, AzureError::BeingFenced { .. }), "{err}");
    assert!(err.to_string().contains("hadb02 is stopping"), "{err}");
    assert_eq!(first.join().unwrap().unwrap(), PowerState::Stopped);
    assert!(killed(s.vm_process_ended()), "hadb02 was powered off");
    let posts: Vec<String> = s
        .log()
        .iter()
        .filter(|e| e["method"] == "POST")
        .filter_map(|e| e["path"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(posts.len(), 1, "one power-off only: {posts:#?}");
    assert!(
        posts[0].contains("/virtualMachines/hadb02/powerOff"),
        "{posts:?}"
    );
    assert!(
        winner.0.try_wait().unwrap().is_none(),
        "hadb01, the winner, still runs"
    );
}

/// Without the race, a fence that looks at its own VM powers the peer off
/// as before: the look is one more read, nothing else.
#[test]
fn a_running_node_that_looks_at_itself_still_fences() {
    let mut s = StandIn::start(
        "self-running",
        true,
        &["--op-seconds", "1", "--vm", "hadb01"],
    );
    let fence = s.fence("hadb02", "30s", "").unwrap().with_own_vm("hadb01");
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    assert!(killed(s.vm_process_ended()));
    // Its own VM unknown to Azure (another resource group, no read
    // permission): it fences, and says it could not look.
    let mut s = StandIn::start("self-unknown", true, &["--op-seconds", "1"]);
    let fence = s
        .fence("hadb02", "30s", "")
        .unwrap()
        .with_own_vm("elsewhere");
    assert_eq!(fence.power_off().unwrap(), PowerState::Stopped);
    assert!(killed(s.vm_process_ended()));
}
