"""Online backup, verified and point-in-time restore, continuous archival, the recovery drill.

Owns: nothing itself; one module per concern — `point` (a consistent prefix
of a store's segment log, read from its files while a server writes),
`objects` (where copies go: a directory or an S3 prefix), `catalog` (the
backup manifest, its parts and digests), `copy` (incremental backup),
`restore`, `archiver` (the server's background archival and commit clock)
and `drill`. docs/operations.md, "Backup and archival", is the contract for
what they write.
"""
