//! Metric series and the cardinality cap (`max_series`): a series is defined once per VM and
//! its id cached; beyond the cap, new series fold into one `overflow` series per metric.

use std::collections::HashMap;

use eastwest_common::metric_name::tagged_name;

/// The value every tag takes in the overflow series.
pub const OVERFLOW: &str = "overflow";

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    /// A series below the cap: its metric id.
    Known(u32),
    /// The cap was reached: the metric's overflow series.
    Overflow(u32),
    /// The host refused to define the metric.
    Unavailable,
}

/// Overflow series a table may hold besides the regular ones: one per metric and reporter
/// (five metrics, two reporters), with room to spare.
pub const OVERFLOW_SERIES_PER_TABLE: usize = 16;

/// The series of one VM.
pub struct SeriesTable {
    max_series: usize,
    ids: HashMap<String, u32>,
    /// Series below the cap (the overflow series are not counted against it).
    regular: usize,
    /// Reused to build lookup keys without allocating on the hot path.
    key: String,
}

impl SeriesTable {
    /// The table is sized for `max_series` plus the overflow series up front, so that no
    /// request pays for growing (rehashing) it.
    pub fn new(max_series: usize) -> SeriesTable {
        SeriesTable {
            max_series,
            ids: HashMap::with_capacity(max_series + OVERFLOW_SERIES_PER_TABLE),
            regular: 0,
            key: String::new(),
        }
    }

    /// Distinct series defined, overflow series included.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of the series `name` with these tag values; `define` is called (with the full
    /// tagged name) only for a series not seen before.
    pub fn lookup(
        &mut self,
        name: &str,
        tags: &[(&str, &str)],
        mut define: impl FnMut(&str) -> Option<u32>,
    ) -> Series {
        self.key.clear();
        self.key.push_str(name);
        for (_, value) in tags {
            self.key.push('\0');
            self.key.push_str(value);
        }
        if let Some(id) = self.ids.get(self.key.as_str()) {
            return Series::Known(*id);
        }
        if self.regular >= self.max_series {
            return self.overflow(name, tags, define);
        }
        match define(&tagged_name(tags, name)) {
            Some(id) => {
                self.ids.insert(self.key.clone(), id);
                self.regular += 1;
                Series::Known(id)
            }
            None => Series::Unavailable,
        }
    }

    /// The overflow series of `name` for this request's reporter: one plugin instance may serve
    /// both directions, and each direction's overflow must land under its own reporter.
    fn overflow(
        &mut self,
        name: &str,
        tags: &[(&str, &str)],
        mut define: impl FnMut(&str) -> Option<u32>,
    ) -> Series {
        let reporter = tags
            .iter()
            .find(|(tag, _)| *tag == "reporter")
            .map_or("", |(_, value)| *value);
        // Keys of overflow series start with a byte no tag value holds; built in the reused
        // buffer, so that an overflowing request allocates nothing.
        self.key.clear();
        self.key.push('\u{1}');
        self.key.push_str(name);
        self.key.push('\0');
        self.key.push_str(reporter);
        if let Some(id) = self.ids.get(self.key.as_str()) {
            return Series::Overflow(*id);
        }
        let folded: Vec<(&str, &str)> = tags
            .iter()
            .map(|(tag, value)| (*tag, if *tag == "reporter" { *value } else { OVERFLOW }))
            .collect();
        match define(&tagged_name(&folded, name)) {
            Some(id) => {
                self.ids.insert(self.key.clone(), id);
                Series::Overflow(id)
            }
            None => Series::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_known_series_is_defined_once() {
        let mut table = SeriesTable::new(10);
        let mut defined = Vec::new();
        let mut define = |name: &str| {
            defined.push(name.to_string());
            Some(defined.len() as u32)
        };
        let tags = [("reporter", "source"), ("source_service", "a")];
        assert_eq!(table.lookup("m", &tags, &mut define), Series::Known(1));
        assert_eq!(table.lookup("m", &tags, &mut define), Series::Known(1));
        assert_eq!(defined, vec!["reporter=.=source;.;source_service=.=a;.;m"]);
    }

    #[test]
    fn beyond_the_cap_series_fold_into_one_overflow_series() {
        let mut table = SeriesTable::new(3);
        let mut next = 0;
        let mut define = |_: &str| {
            next += 1;
            Some(next)
        };
        let mut results = Vec::new();
        for i in 0..10_000 {
            let service = format!("forged-{i}");
            results.push(table.lookup(
                "eastwest_requests_total",
                &[("reporter", "destination"), ("source_service", &service)],
                &mut define,
            ));
        }
        assert!(matches!(results[2], Series::Known(3)));
        assert!(results[3..].iter().all(|r| *r == Series::Overflow(4)));
        assert_eq!(table.len(), 4, "max_series plus the overflow series");
    }

    #[test]
    fn overflow_keeps_the_reporter_and_names_the_rest_overflow() {
        let mut table = SeriesTable::new(0);
        let mut names = Vec::new();
        table.lookup(
            "m",
            &[("reporter", "source"), ("source_service", "x")],
            |name| {
                names.push(name.to_string());
                Some(7)
            },
        );
        assert_eq!(
            names,
            vec!["reporter=.=source;.;source_service=.=overflow;.;m"]
        );
    }

    #[test]
    fn each_reporter_has_its_own_overflow_series() {
        let mut table = SeriesTable::new(1);
        let mut names = Vec::new();
        let mut define = |name: &str| {
            names.push(name.to_string());
            Some(names.len() as u32)
        };
        let lookup = |table: &mut SeriesTable,
                      reporter,
                      service,
                      define: &mut dyn FnMut(&str) -> Option<u32>| {
            table.lookup(
                "m",
                &[("reporter", reporter), ("source_service", service)],
                define,
            )
        };
        assert_eq!(
            lookup(&mut table, "source", "a", &mut define),
            Series::Known(1)
        );
        assert_eq!(
            lookup(&mut table, "source", "b", &mut define),
            Series::Overflow(2)
        );
        assert_eq!(
            lookup(&mut table, "destination", "c", &mut define),
            Series::Overflow(3)
        );
        assert_eq!(
            lookup(&mut table, "destination", "d", &mut define),
            Series::Overflow(3)
        );
        assert_eq!(
            lookup(&mut table, "source", "e", &mut define),
            Series::Overflow(2)
        );
        assert_eq!(
            names[1..],
            [
                "reporter=.=source;.;source_service=.=overflow;.;m",
                "reporter=.=destination;.;source_service=.=overflow;.;m"
            ]
        );
    }

    #[test]
    fn a_refused_definition_is_reported_and_not_cached() {
        let mut table = SeriesTable::new(5);
        assert_eq!(table.lookup("m", &[], |_| None), Series::Unavailable);
        assert!(table.is_empty());
    }
}
