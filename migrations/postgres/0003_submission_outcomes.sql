-- Final delivery outcome per recipient, one row each, so that delivery workers write them in
-- batches without reading the submission first. `submissions.outcome` is no longer written;
-- it still holds the outcomes of records from before this table.
CREATE TABLE submission_outcomes (
    queue_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (queue_id, recipient)
);
