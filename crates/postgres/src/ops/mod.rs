//! One module per operation of the contract: its parameters (a named struct), its rows, and
//! the work the [executor](crate::exec) runs; the SQL text is in [`crate::sql`], named in each
//! module's doc. `rows` holds the values and rows several operations share. The `COPY` path of
//! batches is [`copy`]; partitions, migrations, statistics, plans and watching have modules of
//! their own at the crate's top.

pub(crate) mod cancel;
pub(crate) mod cleanup;
pub(crate) mod copy;
pub(crate) mod counts;
pub(crate) mod health;
pub(crate) mod layout;
pub(crate) mod read;
pub(crate) mod rows;
pub(crate) mod save;
pub(crate) mod scan;
