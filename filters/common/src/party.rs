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
}

impl Party {
    pub fn new(labels: Labels) -> Party {
        Party {
            state: labels.to_complete_members(),
            wire: labels.to_baggage_members(),
            labels,
        }
    }
}

impl From<Labels> for Party {
    fn from(labels: Labels) -> Party {
        Party::new(labels)
    }
}
