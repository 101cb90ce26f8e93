//! SearchMessages: turns the request's filters, sort, time range and paging into a validated
//! [`SearchQuery`], naming the offending field of anything it cannot use. The query itself is
//! built with bound parameters only (`store/postgres.rs`): search text is always data.

use chrono::{DateTime, Utc};
use flare_storage_common::proto::common::{FilterExpression, FilterOperator, SortDirection, SortExpression};
use flare_storage_common::proto::storage::MessageType;
use flare_storage_common::text_search::normalize;

use crate::cursor::Cursor;
use crate::error::Error;

const MAX_FILTERS: usize = 16;
const MAX_VALUES: usize = 100;
/// Longest search text, in characters.
const MAX_TEXT_CHARS: usize = 256;

/// Values a text column must be among (`include`, when given) and must not be (`exclude`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Among<T> {
    pub include: Option<Vec<T>>,
    pub exclude: Vec<T>,
}

impl<T: PartialEq + Clone> Among<T> {
    fn include(&mut self, values: Vec<T>) {
        // Two inclusion filters on one field must both hold: keep their intersection.
        self.include = Some(match self.include.take() {
            None => values,
            Some(current) => current.into_iter().filter(|value| values.contains(value)).collect(),
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Comparison {
    pub fn sql(self) -> &'static str {
        match self {
            Comparison::Eq => "=",
            Comparison::Ne => "<>",
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
            Comparison::Lt => "<",
            Comparison::Le => "<=",
        }
    }
}

/// A validated search.
#[derive(Debug, Default)]
pub struct SearchQuery {
    pub tenant_id: String,
    /// The acting user, whose hidden and cleared messages are left out ('' = nobody's).
    pub user: String,
    /// Substrings the text content must all contain, in the searchable normal form
    /// (`flare_storage_common::text_search::normalize`).
    pub contains: Vec<String>,
    pub session_id: Among<String>,
    pub sender_id: Among<String>,
    pub business_type: Among<String>,
    pub message_type: Among<i32>,
    /// Tags of which a message must have at least one / may have none.
    pub tags: Among<String>,
    pub seq: Vec<(Comparison, i64)>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub ascending: bool,
    pub after: Option<Cursor>,
    pub limit: u32,
}

/// The scope a search cursor is bound to (no session can be named "").
pub const CURSOR_SCOPE: &str = "";

impl SearchQuery {
    pub fn parse(
        tenant_id: &str,
        user: &str,
        filters: &[FilterExpression],
        sort: &[SortExpression],
    ) -> Result<Self, Error> {
        let mut query = SearchQuery { tenant_id: tenant_id.into(), user: user.into(), ..Default::default() };
        if filters.len() > MAX_FILTERS {
            return Err(Error::invalid("filters", format!("at most {MAX_FILTERS} filters")));
        }
        for filter in filters {
            query.add_filter(filter)?;
        }
        match sort {
            [] => {}
            [expression] => {
                if !matches!(expression.field.as_str(), "timestamp" | "time") {
                    return Err(Error::invalid(
                        "sort.field",
                        format!("cannot sort by {:?}; use \"timestamp\"", expression.field),
                    ));
                }
                query.ascending = match SortDirection::try_from(expression.direction) {
                    Ok(SortDirection::Asc) => true,
                    Ok(SortDirection::Desc | SortDirection::Unspecified) => false,
                    Err(_) => {
                        return Err(Error::invalid(
                            "sort.direction",
                            format!("unknown value {}", expression.direction),
                        ));
                    }
                };
            }
            _ => return Err(Error::invalid("sort", "at most one sort expression")),
        }
        Ok(query)
    }

    fn add_filter(&mut self, filter: &FilterExpression) -> Result<(), Error> {
        let op = FilterOperator::try_from(filter.op)
            .map_err(|_| Error::invalid("filters.op", format!("unknown operator {}", filter.op)))?;
        if filter.values.is_empty() || filter.values.len() > MAX_VALUES {
            return Err(Error::invalid("filters.values", format!("{}: give 1 to {MAX_VALUES} values", filter.field)));
        }
        for value in &filter.values {
            if value.chars().any(char::is_control) || value.len() > 1024 {
                return Err(Error::invalid(
                    "filters.values",
                    format!("{}: values must be short plain text", filter.field),
                ));
            }
        }
        let unsupported =
            || Error::invalid("filters.op", format!("{} does not support {}", filter.field, op.as_str_name()));
        let single = || match filter.values.as_slice() {
            [value] => Ok(value.clone()),
            _ => {
                Err(Error::invalid("filters.values", format!("{} {} takes one value", filter.field, op.as_str_name())))
            }
        };
        match filter.field.as_str() {
            "content" => {
                if op != FilterOperator::Contains {
                    return Err(unsupported());
                }
                for text in &filter.values {
                    if text.is_empty() || text.chars().count() > MAX_TEXT_CHARS {
                        return Err(Error::invalid(
                            "filters.values",
                            format!("content: 1 to {MAX_TEXT_CHARS} characters"),
                        ));
                    }
                    // Matched in normal form (`text_search`): case, width and composition aside.
                    let normal = normalize(text);
                    if normal.is_empty() {
                        return Err(Error::invalid("filters.values", "content: nothing to search for"));
                    }
                    self.contains.push(normal);
                }
            }
            "session_id" | "sender_id" | "business_type" => {
                let target = match filter.field.as_str() {
                    "session_id" => &mut self.session_id,
                    "sender_id" => &mut self.sender_id,
                    _ => &mut self.business_type,
                };
                match op {
                    FilterOperator::Eq | FilterOperator::In => target.include(filter.values.clone()),
                    FilterOperator::Ne | FilterOperator::NotIn => target.exclude.extend(filter.values.iter().cloned()),
                    _ => return Err(unsupported()),
                }
            }
            "message_type" => {
                let values = filter.values.iter().map(|value| message_type(value)).collect::<Result<Vec<_>, _>>()?;
                match op {
                    FilterOperator::Eq | FilterOperator::In => self.message_type.include(values),
                    FilterOperator::Ne | FilterOperator::NotIn => self.message_type.exclude.extend(values),
                    _ => return Err(unsupported()),
                }
            }
            "tags" => match op {
                FilterOperator::Eq | FilterOperator::In | FilterOperator::Contains => {
                    self.tags.include(filter.values.clone())
                }
                FilterOperator::Ne | FilterOperator::NotIn => self.tags.exclude.extend(filter.values.iter().cloned()),
                _ => return Err(unsupported()),
            },
            "seq" => {
                let comparison = match op {
                    FilterOperator::Eq => Comparison::Eq,
                    FilterOperator::Ne => Comparison::Ne,
                    FilterOperator::Gt => Comparison::Gt,
                    FilterOperator::Ge => Comparison::Ge,
                    FilterOperator::Lt => Comparison::Lt,
                    FilterOperator::Le => Comparison::Le,
                    _ => return Err(unsupported()),
                };
                let value =
                    single()?.parse::<i64>().map_err(|_| Error::invalid("filters.values", "seq takes an integer"))?;
                self.seq.push((comparison, value));
            }
            other => {
                return Err(Error::invalid(
                    "filters.field",
                    format!(
                        "unknown field {other:?} (content, session_id, sender_id, message_type, business_type, tags, seq)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn message_type(value: &str) -> Result<i32, Error> {
    if let Ok(number) = value.parse::<i32>() {
        return MessageType::try_from(number)
            .map(|kind| kind as i32)
            .map_err(|_| Error::invalid("filters.values", format!("unknown message_type {number}")));
    }
    let name = value.to_ascii_uppercase();
    let name = if name.starts_with("MESSAGE_TYPE_") { name } else { format!("MESSAGE_TYPE_{name}") };
    MessageType::from_str_name(&name)
        .map(|kind| kind as i32)
        .ok_or_else(|| Error::invalid("filters.values", format!("unknown message_type {value:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(field: &str, op: FilterOperator, values: &[&str]) -> FilterExpression {
        FilterExpression {
            field: field.into(),
            op: op as i32,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn filters_are_parsed_by_field() {
        let query = SearchQuery::parse(
            "t",
            "u",
            &[
                filter("content", FilterOperator::Contains, &["消息"]),
                filter("session_id", FilterOperator::In, &["a", "b"]),
                filter("session_id", FilterOperator::Eq, &["b"]),
                filter("message_type", FilterOperator::Eq, &["TEXT"]),
                filter("tags", FilterOperator::NotIn, &["spam"]),
                filter("seq", FilterOperator::Ge, &["10"]),
            ],
            &[SortExpression { field: "timestamp".into(), direction: SortDirection::Asc as i32 }],
        )
        .expect("valid");
        assert_eq!(query.contains, ["消息"]);
        let folded = SearchQuery::parse("t", "", &[filter("content", FilterOperator::Contains, &["ＣＡＦÉ"])], &[])
            .expect("valid");
        assert_eq!(folded.contains, ["café"]);
        assert_eq!(query.session_id.include, Some(vec!["b".to_owned()]));
        assert_eq!(query.message_type.include, Some(vec![MessageType::Text as i32]));
        assert_eq!(query.tags.exclude, ["spam"]);
        assert_eq!(query.seq, [(Comparison::Ge, 10)]);
        assert!(query.ascending);
    }

    #[test]
    fn unknown_fields_and_operators_are_named() {
        let error =
            SearchQuery::parse("t", "", &[filter("colour", FilterOperator::Eq, &["red"])], &[]).expect_err("field");
        assert!(error.to_string().contains("colour"), "{error}");
        let error =
            SearchQuery::parse("t", "", &[filter("content", FilterOperator::Gt, &["x"])], &[]).expect_err("operator");
        assert!(error.to_string().contains("FILTER_OPERATOR_GT"), "{error}");
        let bad_op = FilterExpression { field: "seq".into(), op: 99, values: vec!["1".into()] };
        assert!(SearchQuery::parse("t", "", &[bad_op], &[]).expect_err("op 99").to_string().contains("99"));
        let error = SearchQuery::parse("t", "", &[], &[SortExpression { field: "size".into(), direction: 0 }])
            .expect_err("sort");
        assert!(error.to_string().starts_with("sort.field"), "{error}");
        let error = SearchQuery::parse("t", "", &[filter("seq", FilterOperator::Gt, &["x"])], &[]).expect_err("seq");
        assert!(error.to_string().contains("integer"), "{error}");
    }
}
