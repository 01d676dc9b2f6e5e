//! Micro-benchmarks of the pure functions on the per-message path, so regressions show:
//! command parsing, DATA unstuffing, the header rewrite, and one DKIM signature per algorithm.
//!
//!     cargo bench --bench hot_paths

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use submitd::config::{DkimKeyConfig, PrivacyConfig};
use submitd::dkim::{generate_key, KeyType, Signer};
use submitd::message::{Address, ClientInfo, Envelope, Identity, QueueId};
use submitd::pipeline::{prepare, PrepareContext};
use submitd::smtp::command;
use submitd::smtp::data::ContentReader;
use submitd::smtp::session::Submission;

/// A realistic message of about `size` bytes: headers, text lines, some starting with dots.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"Received: from laptop.local ([192.168.1.20])\r\n\tby laptop with SMTP\r\nFrom: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: quarterly numbers\r\nMessage-ID: <m1@laptop.local>\r\nDate: Fri, 4 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nX-Originating-IP: [192.168.1.20]\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < size {
        if i % 17 == 0 {
            m.extend_from_slice(b".a line that starts with a dot\r\n");
        } else {
            m.extend_from_slice(
                b"The quick brown fox jumps over the lazy dog, again and again, all day.\r\n",
            );
        }
        i += 1;
    }
    m
}

fn stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut line_start = true;
    for &b in message {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn parse_commands(c: &mut Criterion) {
    let lines: [&[u8]; 4] = [
        b"MAIL FROM:<alice@example.org> SIZE=4096 BODY=8BITMIME\r\n",
        b"RCPT TO:<bob@example.net>\r\n",
        b"EHLO laptop.example.org\r\n",
        b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==\r\n",
    ];
    c.bench_function("command/parse 4 lines", |b| {
        b.iter(|| {
            for line in lines {
                let _ = black_box(command::parse(black_box(line)));
            }
        })
    });
}

fn unstuff(c: &mut Criterion) {
    let mut group = c.benchmark_group("data/unstuff");
    for size in [4 * 1024, 100 * 1024] {
        let wire = stuffed(&message(size));
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("{} KiB in 16 KiB reads", size / 1024), |b| {
            b.iter(|| {
                let mut reader = ContentReader::dot_stuffed(1 << 26);
                let mut out = Vec::with_capacity(wire.len());
                for chunk in wire.chunks(16 * 1024) {
                    if reader.feed(chunk, &mut out).is_some() {
                        break;
                    }
                }
                black_box(out)
            })
        });
    }
    group.finish();
}

fn submission() -> Submission {
    Submission {
        envelope: Envelope {
            sender: "alice@example.org".into(),
            recipients: vec!["bob@example.net".into()],
        },
        identity: Identity {
            user_id: 1,
            login: Address::parse("alice@example.org").unwrap(),
            allowed: vec![],
            received: None,
        },
        ehlo: "laptop".into(),
    }
}

fn rewrite_headers(c: &mut Criterion) {
    let msg = message(4 * 1024);
    let privacy = PrivacyConfig::default();
    let id = QueueId::parse("BENCH1").unwrap();
    let client = ClientInfo {
        address: "192.0.2.7".parse().unwrap(),
        ehlo: "laptop".into(),
        tls: None,
        implicit_tls: false,
    };
    let sub = submission();
    c.bench_function("policy/prepare 4 KiB", |b| {
        b.iter(|| {
            let ctx = PrepareContext {
                hostname: "mx.example.org",
                privacy: &privacy,
                queue_id: &id,
                client: &client,
                now: 1_796_399_273,
                random: 42,
            };
            black_box(prepare(&sub, msg.clone(), &ctx).unwrap())
        })
    });
}

fn dkim_sign(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let msg = message(4 * 1024);
    let split = msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    let parts: [&[u8]; 2] = [&msg[..split], &msg[split..]];
    let names: Vec<String> = [
        "From",
        "From",
        "To",
        "Subject",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
    ]
    .map(String::from)
    .to_vec();
    let mut group = c.benchmark_group("dkim/sign 4 KiB");
    for (label, key_type) in [("ed25519", KeyType::Ed25519), ("rsa-2048", KeyType::Rsa)] {
        let path = dir.path().join(format!("{label}.pem"));
        std::fs::write(&path, generate_key(key_type, 2048).unwrap()).unwrap();
        let signer = Signer::load(&[DkimKeyConfig {
            domain: "example.org".into(),
            selector: "s1".into(),
            key: path,
            sign: true,
        }])
        .unwrap();
        group.bench_function(label, |b| {
            b.iter(|| black_box(signer.sign("example.org", &parts, &names).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, parse_commands, unstuff, rewrite_headers, dkim_sign);
criterion_main!(benches);
