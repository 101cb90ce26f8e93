//! The deployment files agree with the binaries: every Kubernetes manifest and the
//! docker-compose file parse, name images, probes and ports the binaries really serve, set
//! only documented variables, and give each binary a configuration it accepts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_norway::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = <Value as serde::Deserialize>::deserialize(document)
            .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut current = value;
    for key in path {
        current = current.get(*key)?;
    }
    current.as_str()
}

fn number(value: &Value, path: &[&str]) -> Option<i64> {
    let mut current = value;
    for key in path {
        current = current.get(*key)?;
    }
    current.as_i64()
}

/// Variables the README documents (the first column of its configuration tables).
fn documented_variables() -> anyhow::Result<Vec<String>> {
    let readme = std::fs::read_to_string(repository().join("README.md"))?;
    Ok(readme
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .map(str::to_owned)
        .collect())
}

fn port_of(address: &str) -> Option<i64> {
    address.rsplit_once(':')?.1.parse().ok()
}

struct Manifests {
    by_kind: HashMap<String, Vec<Value>>,
}

impl Manifests {
    fn load() -> anyhow::Result<Self> {
        let directory = repository().join("deploy/k8s");
        let kustomization = documents(&directory.join("kustomization.yaml"))?.remove(0);
        let mut by_kind: HashMap<String, Vec<Value>> = HashMap::new();
        let resources = kustomization.get("resources").and_then(Value::as_sequence).cloned().unwrap_or_default();
        anyhow::ensure!(!resources.is_empty(), "kustomization lists no resources");
        for resource in resources.iter().filter_map(Value::as_str) {
            for document in documents(&directory.join(resource))? {
                let kind = text(&document, &["kind"]).unwrap_or_default().to_owned();
                by_kind.entry(kind).or_default().push(document);
            }
        }
        by_kind.entry("Kustomization".into()).or_default().push(kustomization);
        for document in documents(&directory.join("secret.example.yaml"))? {
            by_kind.entry("Secret".into()).or_default().push(document);
        }
        Ok(Self { by_kind })
    }

    fn named(&self, kind: &str, name: &str) -> anyhow::Result<&Value> {
        self.by_kind
            .get(kind)
            .and_then(|documents| documents.iter().find(|d| text(d, &["metadata", "name"]) == Some(name)))
            .ok_or_else(|| anyhow::anyhow!("no {kind} named {name}"))
    }

    /// The environment a Deployment's container gets: ConfigMaps, then Secret references.
    fn environment(&self, deployment: &Value) -> anyhow::Result<BTreeMap<String, String>> {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mut environment = BTreeMap::new();
        for source in container["envFrom"].as_sequence().cloned().unwrap_or_default() {
            let name = text(&source, &["configMapRef", "name"])
                .ok_or_else(|| anyhow::anyhow!("envFrom without configMapRef"))?;
            let config_map = self.named("ConfigMap", name)?;
            for (key, value) in config_map["data"].as_mapping().cloned().unwrap_or_default() {
                let value =
                    value.as_str().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("{key:?} is not a string"))?;
                environment.insert(key.as_str().unwrap_or_default().to_owned(), value);
            }
        }
        let secret = self.named("Secret", "flare-storage-secrets")?;
        for variable in container["env"].as_sequence().cloned().unwrap_or_default() {
            let name = text(&variable, &["name"]).unwrap_or_default().to_owned();
            let key = text(&variable, &["valueFrom", "secretKeyRef", "key"])
                .ok_or_else(|| anyhow::anyhow!("{name}: only secret references are expected in env"))?;
            let value = text(secret, &["stringData", key]).ok_or_else(|| anyhow::anyhow!("secret lacks {key}"))?;
            environment.insert(name, value.to_owned());
        }
        Ok(environment)
    }
}

#[test]
fn kubernetes_manifests_match_the_binaries() -> anyhow::Result<()> {
    let manifests = Manifests::load()?;
    let documented = documented_variables()?;
    let kustomization = &manifests.by_kind["Kustomization"][0];
    let images: Vec<&str> = kustomization["images"]
        .as_sequence()
        .map(|images| images.iter().filter_map(|image| text(image, &["name"])).collect())
        .unwrap_or_default();

    for (name, metrics_default) in [("flare-storage-writer", 9100), ("flare-storage-reader", 9101)] {
        let deployment = manifests.named("Deployment", name)?;
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let image = text(container, &["image"]).unwrap_or_default();
        assert!(images.contains(&image), "{name}: image {image} is not set by the kustomization");
        assert_eq!(number(pod, &["securityContext", "runAsUser"]), Some(10001), "{name}: the image's non-root user");

        let environment = manifests.environment(deployment)?;
        for variable in environment.keys() {
            assert!(documented.contains(variable), "{name}: {variable} is not documented in the README");
        }
        let metrics_port = environment.get("METRICS_ADDR").and_then(|a| port_of(a)).unwrap_or(metrics_default);
        let ports: HashMap<&str, i64> = container["ports"]
            .as_sequence()
            .map(|ports| {
                ports.iter().filter_map(|p| Some((text(p, &["name"])?, number(p, &["containerPort"])?))).collect()
            })
            .unwrap_or_default();
        assert_eq!(ports.get("metrics"), Some(&metrics_port), "{name}: metrics port");
        assert_eq!(text(container, &["livenessProbe", "httpGet", "path"]), Some("/healthz"), "{name}");
        assert_eq!(text(container, &["livenessProbe", "httpGet", "port"]), Some("metrics"), "{name}");
        assert!(container["resources"]["limits"]["memory"].is_string(), "{name}: memory limit");

        let lookup = |key: &str| environment.get(key).cloned();
        if name == "flare-storage-writer" {
            let config =
                flare_storage_writer::Config::from_lookup(lookup).map_err(|e| anyhow::anyhow!("writer: {e}"))?;
            assert_eq!(text(container, &["readinessProbe", "httpGet", "path"]), Some("/readyz"));
            let grace = number(pod, &["terminationGracePeriodSeconds"]).unwrap_or(30);
            assert!(
                grace > config.shutdown_timeout.as_secs() as i64,
                "grace period {grace}s must exceed the writer's drain bound {:?}",
                config.shutdown_timeout
            );
        } else {
            let config =
                flare_storage_reader::Config::from_lookup(lookup).map_err(|e| anyhow::anyhow!("reader: {e}"))?;
            let grpc_port = i64::from(config.grpc_addr.port());
            assert_eq!(ports.get("grpc"), Some(&grpc_port));
            assert_eq!(number(container, &["readinessProbe", "grpc", "port"]), Some(grpc_port));
            assert_eq!(
                text(container, &["readinessProbe", "grpc", "service"]),
                Some("flare.storage.v1.StorageReaderService"),
                "the gRPC health service name the reader reports"
            );
            let service = manifests.named("Service", name)?;
            let targets: Vec<&str> = service["spec"]["ports"]
                .as_sequence()
                .map(|ports| ports.iter().filter_map(|p| text(p, &["targetPort"])).collect())
                .unwrap_or_default();
            assert!(targets.contains(&"grpc"), "the Service routes to the gRPC port");
            let hpa = manifests.named("HorizontalPodAutoscaler", name)?;
            assert_eq!(text(hpa, &["spec", "scaleTargetRef", "name"]), Some(name));
        }

        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let budget = manifests.named("PodDisruptionBudget", name)?;
        for (key, value) in budget["spec"]["selector"]["matchLabels"].as_mapping().cloned().unwrap_or_default() {
            assert_eq!(labels.get(key.as_str().unwrap_or_default()), Some(&value), "{name}: PDB selects its pods");
        }
    }
    Ok(())
}

#[test]
fn docker_compose_runs_both_binaries_with_valid_settings() -> anyhow::Result<()> {
    let compose = documents(&repository().join("docker-compose.yml"))?.remove(0);
    let documented = documented_variables()?;
    let services = compose["services"].as_mapping().cloned().unwrap_or_default();
    for required in ["kafka", "redis", "timescaledb", "mongo", "writer", "reader", "prometheus"] {
        assert!(services.contains_key(required), "compose lacks {required}");
    }
    for (name, target) in [("writer", "writer"), ("reader", "reader")] {
        let service = &compose["services"][name];
        assert_eq!(text(service, &["build", "target"]), Some(target));
        let environment: HashMap<String, String> = service["environment"]
            .as_mapping()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| {
                (key.as_str().unwrap_or_default().to_owned(), value.as_str().unwrap_or_default().to_owned())
            })
            .collect();
        for variable in environment.keys() {
            assert!(documented.contains(variable), "compose {name}: {variable} is not documented");
        }
        let lookup = |key: &str| environment.get(key).cloned();
        match name {
            "writer" => drop(flare_storage_writer::Config::from_lookup(lookup).map_err(|e| anyhow::anyhow!("{e}"))?),
            _ => drop(flare_storage_reader::Config::from_lookup(lookup).map_err(|e| anyhow::anyhow!("{e}"))?),
        }
        for dependency in service["depends_on"].as_mapping().cloned().unwrap_or_default().keys() {
            let dependency = dependency.as_str().unwrap_or_default();
            let has_check = compose["services"][dependency]["healthcheck"].is_mapping();
            let condition = text(service, &["depends_on", dependency, "condition"]);
            assert!(
                has_check || condition == Some("service_completed_successfully"),
                "compose {name}: waits for {dependency}, which has no healthcheck"
            );
        }
    }
    Ok(())
}
