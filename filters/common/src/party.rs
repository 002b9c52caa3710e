//! One end of a call as a filter resolved it, with the encodings the filters write it in,
//! computed once: the filter-state value (all six labels) and the baggage members (the labels
//! that are known).

use crate::labels::Labels;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Party {
    pub labels: Labels,
    /// All six labels as baggage members, `unknown` included: the filter-state value.
    pub state: String,
    /// The known labels as baggage members (`baggage`, `x-eastwest-peer`, `x-eastwest-source`).
    pub wire: String,
    /// The hash of `state`, for tables keyed by parties.
    pub hash: u64,
}

impl Party {
    pub fn new(labels: Labels) -> Party {
        let state = labels.to_complete_members();
        Party {
            hash: crate::bytes::hash(0, state.as_bytes()),
            state,
            wire: labels.to_baggage_members(),
            labels,
        }
    }

    /// The same labels: the same party (cheap when it is the same resolution).
    pub fn same_as(self: &std::rc::Rc<Party>, other: &std::rc::Rc<Party>) -> bool {
        std::rc::Rc::ptr_eq(self, other)
            || (self.hash == other.hash
                && crate::bytes::equal(self.state.as_bytes(), other.state.as_bytes()))
    }
}
