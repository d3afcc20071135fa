//! Multi-row statements for the SQLite writer's hot path: one `INSERT … VALUES (…), (…),
//! …` runs SQLite's VM once for a chunk of rows instead of once per row (the rollup
//! marks every commit sets), which was a measurable share of every commit.

/// `{head} VALUES {row}, {row}, … {tail}` with `rows` copies of `row`.
pub(crate) fn statement(head: &str, row: &str, rows: usize, tail: &str) -> String {
    format!("{head} VALUES {} {tail}", vec![row; rows].join(", "))
}

/// A row as a multi-row statement binds it: its parameters from `?first` on.
pub(crate) trait BindRow {
    const PARAMS: usize;
    fn bind(&self, statement: &mut rusqlite::CachedStatement<'_>, first: usize) -> rusqlite::Result<()>;
}

/// Three integers: a rollup mark (bucket, series, generation).
impl BindRow for (i64, i64, i64) {
    const PARAMS: usize = 3;
    fn bind(&self, statement: &mut rusqlite::CachedStatement<'_>, first: usize) -> rusqlite::Result<()> {
        statement.raw_bind_parameter(first, self.0)?;
        statement.raw_bind_parameter(first + 1, self.1)?;
        statement.raw_bind_parameter(first + 2, self.2)
    }
}

/// Binds a chunk of rows to a statement of as many `VALUES` rows.
pub(crate) fn bind_rows<R: BindRow>(
    statement: &mut rusqlite::CachedStatement<'_>,
    rows: impl IntoIterator<Item = R>,
) -> rusqlite::Result<()> {
    for (i, row) in rows.into_iter().enumerate() {
        row.bind(statement, i * R::PARAMS + 1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn statements_repeat_the_row() {
        assert_eq!(
            super::statement("INSERT INTO t (a, b)", "(?, ?)", 3, "ON CONFLICT DO NOTHING"),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) ON CONFLICT DO NOTHING"
        );
    }
}
