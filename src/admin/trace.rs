//! `submitd trace ID`: who submitted the message whose Received header carries this id.

use anyhow::bail;

use super::when;
use crate::store::Store;

/// Prints the trace record of one queue id.
pub async fn show(store: &Store, id: &str, json: bool) -> anyhow::Result<()> {
    let id = id.trim().to_ascii_uppercase();
    let Some(record) = store.find_trace(&id).await? else {
        bail!("no trace record for {id} (unknown, or older than the retention period)");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
        return Ok(());
    }
    println!("queue id:    {}", record.queue_id);
    println!("user:        {}", record.user);
    println!("client:      {}", record.client_ip);
    println!("ehlo:        {}", record.ehlo);
    println!("tls:         {}", record.tls_version);
    println!("received:    {}", when(record.received_at));
    println!("sender:      <{}>", record.sender);
    for r in &record.recipients {
        let outcome = record.outcome.get(r).map_or("queued", String::as_str);
        println!("recipient:   <{r}>  {outcome}");
    }
    Ok(())
}
