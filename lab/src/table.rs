//! Reachability truth tables, as the upstream NetworkPolicy tests print them: one table per
//! port and protocol, a row per client, a column per server, `.` where a connection was made
//! and `X` where none was. A test writes the table it expects in the same text and compares.

use std::fmt;

pub const CONNECTED: &str = ".";
pub const BLOCKED: &str = "X";

/// Column-aligned text: a header line (`corner`, then `cols`) and one line per row.
pub fn grid(
    corner: &str,
    rows: &[String],
    cols: &[String],
    cell: impl Fn(usize, usize) -> String,
) -> String {
    let cells: Vec<Vec<String>> = (0..rows.len())
        .map(|r| (0..cols.len()).map(|c| cell(r, c)).collect())
        .collect();
    let first = rows
        .iter()
        .map(String::len)
        .chain([corner.len()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(c, name)| {
            cells
                .iter()
                .map(|row| row[c].len())
                .chain([name.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |head: &str, items: &mut dyn Iterator<Item = &str>| {
        let mut s = format!("{head:<first$}");
        for (item, w) in items.zip(&widths) {
            s.push_str(&format!(" {item:<w$}"));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(corner, &mut cols.iter().map(String::as_str));
    for (name, row) in rows.iter().zip(&cells) {
        out.push_str(&line(name, &mut row.iter().map(String::as_str)));
    }
    out
}

/// One truth table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `80/TCP`
    pub title: String,
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    /// `cells[row][col]`: connected.
    pub cells: Vec<Vec<bool>>,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&grid(&self.title, &self.rows, &self.cols, |r, c| {
            if self.cells[r][c] { CONNECTED } else { BLOCKED }.to_string()
        }))
    }
}

/// Tables as `Display` writes them, separated by blank lines; `#` starts a comment line and
/// spacing is free.
pub fn parse(text: &str) -> Result<Vec<Table>, String> {
    let mut tables = Vec::new();
    let mut current: Option<Table> = None;
    for (n, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.trim_start().starts_with('#') {
            continue;
        }
        if words.is_empty() {
            tables.extend(current.take());
            continue;
        }
        match current.as_mut() {
            None => {
                current = Some(Table {
                    title: words[0].into(),
                    rows: Vec::new(),
                    cols: words[1..].iter().map(|s| s.to_string()).collect(),
                    cells: Vec::new(),
                })
            }
            Some(t) => {
                if words.len() != t.cols.len() + 1 {
                    return Err(format!(
                        "line {}: {} cells for {} columns",
                        n + 1,
                        words.len() - 1,
                        t.cols.len()
                    ));
                }
                let row = words[1..]
                    .iter()
                    .map(|w| match *w {
                        CONNECTED => Ok(true),
                        BLOCKED => Ok(false),
                        other => Err(format!(
                            "line {}: cell {other:?} is neither {CONNECTED} nor {BLOCKED}",
                            n + 1
                        )),
                    })
                    .collect::<Result<Vec<bool>, String>>()?;
                t.rows.push(words[0].into());
                t.cells.push(row);
            }
        }
    }
    tables.extend(current);
    Ok(tables)
}

/// A cell where observation and expectation differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub title: String,
    pub from: String,
    pub to: String,
    pub expected: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |b: bool| if b { "connected" } else { "blocked" };
        write!(
            f,
            "{} {} -> {}: expected {}, observed {}",
            self.title,
            self.from,
            self.to,
            word(self.expected),
            word(!self.expected)
        )
    }
}

/// The cells of `observed` that differ from `expected`. The tables must have the same titles,
/// rows and columns in the same order (an error says which differ).
pub fn compare(expected: &[Table], observed: &[Table]) -> Result<Vec<Mismatch>, String> {
    let titles = |ts: &[Table]| ts.iter().map(|t| t.title.clone()).collect::<Vec<_>>();
    if titles(expected) != titles(observed) {
        return Err(format!(
            "expected tables {:?}, observed {:?}",
            titles(expected),
            titles(observed)
        ));
    }
    let mut out = Vec::new();
    for (e, o) in expected.iter().zip(observed) {
        if e.rows != o.rows || e.cols != o.cols {
            return Err(format!(
                "{}: expected rows {:?} and columns {:?}, observed {:?} and {:?}",
                e.title, e.rows, e.cols, o.rows, o.cols
            ));
        }
        for (r, from) in e.rows.iter().enumerate() {
            for (c, to) in e.cols.iter().enumerate() {
                if e.cells[r][c] != o.cells[r][c] {
                    out.push(Mismatch {
                        title: e.title.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        expected: e.cells[r][c],
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn table() -> Table {
        Table {
            title: "80/TCP".into(),
            rows: names(&["x/a", "y/bb"]),
            cols: names(&["x/a", "y/bb", "z/c"]),
            cells: vec![vec![true, false, true], vec![false, true, true]],
        }
    }

    #[test]
    fn formats_aligned_like_upstream() {
        assert_eq!(
            table().to_string(),
            "80/TCP x/a y/bb z/c\n\
             x/a    .   X    .\n\
             y/bb   X   .    .\n"
        );
    }

    #[test]
    fn round_trips_and_reads_free_spacing() {
        let t = table();
        let mut second = t.clone();
        second.title = "81/UDP".into();
        let text = format!("# expected\n{t}\n\n{second}");
        assert_eq!(parse(&text).unwrap(), vec![t.clone(), second]);
        let loose = "80/TCP x/a y/bb z/c\nx/a . X .\n  y/bb\tX . .\n";
        assert_eq!(parse(loose).unwrap(), vec![t]);
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = parse("80/TCP a b\na . \n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("1 cells for 2"), "{e}");
        let e = parse("80/TCP a\na ok\n").unwrap_err();
        assert!(e.contains("\"ok\""), "{e}");
    }

    #[test]
    fn compare_names_each_differing_cell() {
        let e = table();
        let mut o = table();
        o.cells[0][1] = true;
        o.cells[1][2] = false;
        let m = compare(std::slice::from_ref(&e), &[o]).unwrap();
        assert_eq!(
            m.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            [
                "80/TCP x/a -> y/bb: expected blocked, observed connected",
                "80/TCP y/bb -> z/c: expected connected, observed blocked"
            ]
        );
        assert!(compare(std::slice::from_ref(&e), std::slice::from_ref(&e))
            .unwrap()
            .is_empty());
        let mut other = e.clone();
        other.cols.reverse();
        assert!(compare(std::slice::from_ref(&e), &[other]).is_err());
        assert!(compare(&[e], &[]).is_err());
    }

    #[test]
    fn grid_pads_to_the_widest_cell() {
        let g = grid("from \\ to", &names(&["a"]), &names(&["b", "c"]), |_, c| {
            if c == 0 {
                "ok".into()
            } else {
                "ping+tcp".into()
            }
        });
        assert_eq!(g, "from \\ to b  c\na         ok ping+tcp\n");
    }
}
