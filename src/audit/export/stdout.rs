//! The standard output sink: one ECS JSON document per line, for a log
//! shipper (Filebeat, Fluent Bit, Vector) that reads the container's output.
//! The service's own logs go to standard error, so the two never mix.

use std::io::Write;

use anyhow::Context;

use super::format;

pub(super) async fn send(records: &[format::ExportRecord]) -> anyhow::Result<()> {
    let host = format::hostname();
    let mut lines = Vec::with_capacity(records.len() * 800);
    for record in records {
        serde_json::to_writer(&mut lines, &format::ecs(record, host))
            .context("encode ECS document")?;
        lines.push(b'\n');
    }
    // One locked write, off the runtime: a slow reader of the pipe blocks
    // this thread, not the runtime's.
    tokio::task::spawn_blocking(move || {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&lines)?;
        stdout.flush()
    })
    .await
    .context("standard output writer")?
    .context("write to standard output")
}
