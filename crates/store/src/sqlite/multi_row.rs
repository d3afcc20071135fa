//! Multi-row statements for the SQLite writer's hot path: one `INSERT … VALUES (…), (…),
//! …` runs SQLite's VM once for a chunk of rows instead of once per row (the rollup
//! marks every commit sets, bound in `rollups::set_minute_marks`), which was a
//! measurable share of every commit.

/// `{head} VALUES {row}, {row}, … {tail}` with `rows` copies of `row`.
pub(crate) fn statement(head: &str, row: &str, rows: usize, tail: &str) -> String {
    format!("{head} VALUES {} {tail}", vec![row; rows].join(", "))
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
