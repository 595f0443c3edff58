//! A device's own network for the end-to-end tests: a network namespace joined to the
//! host by a veth pair, which a test can cut (link down) and slow (tc), and curl from
//! inside. Needs `ip`, `tc` and `curl`, and the privileges to use them. Test support:
//! panics on failure, removes the namespace and the link on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

use std::process::Command;

/// A network namespace with a veth pair to the host: the device's own network, which
/// a test can cut (link down) and slow (tc).
#[derive(Debug)]
pub struct Netns {
    /// The namespace (`ip netns exec <name>`).
    pub name: String,
    host_if: String,
    /// The host's address on the pair, as the device reaches it.
    pub host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A namespace named after this process, with its end of the pair up.
    pub fn create() -> Self {
        let id = std::process::id() % 10000;
        let subnet = std::process::id() % 250;
        let name = format!("ef{id}");
        let host_if = format!("efh{id}");
        let dev_if = format!("efd{id}");
        let host_ip = format!("10.213.{subnet}.1");
        let dev_ip = format!("10.213.{subnet}.2");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &dev_if,
        ]);
        ip(&["link", "set", &dev_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for args in [
            vec!["addr", "add", &format!("{dev_ip}/30"), "dev", &dev_if],
            vec!["link", "set", &dev_if, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["netns", "exec", &name, "ip"];
            a.extend(args.iter().map(|s| &**s));
            ip(&a);
        }
        Self {
            name,
            host_if,
            host_ip,
        }
    }

    /// Cuts (false) or restores (true) the device's link to the host.
    pub fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }

    /// Limits host→device traffic (downloads) to `rate`, or lifts the limit.
    pub fn shape(&self, rate: Option<&str>) {
        let mut c = Command::new("tc");
        match rate {
            Some(r) => c.args([
                "qdisc",
                "replace",
                "dev",
                &self.host_if,
                "root",
                "tbf",
                "rate",
                r,
                "burst",
                "64kb",
                "latency",
                "500ms",
            ]),
            None => c.args(["qdisc", "del", "dev", &self.host_if, "root"]),
        };
        assert!(c.status().unwrap().success());
    }

    /// GET or POST from inside the device's network (its local clients).
    pub fn curl(&self, url: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-s",
            "-m",
            "60",
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "-d", b]);
        }
        let out = c.arg(url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}
