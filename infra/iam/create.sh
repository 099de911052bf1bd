#!/usr/bin/env bash
# Create the IAM policies, roles and instance profiles of infra/iam/roles.json in an AWS account.
#
#   ACCOUNT=<12-digit account id> OIDC_PROVIDER=<EKS OIDC issuer without https://> infra/iam/create.sh
#
# OIDC_PROVIDER (e.g. oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE, from
# `aws eks describe-cluster --name NAME --query cluster.identity.oidc.issuer --output text`) is only
# needed for the KubeRay roles; without it they are skipped. The policy files name account
# 123456789012; it is replaced by ACCOUNT. Run once per account (it fails if the objects exist).
set -euo pipefail
cd "$(dirname "$0")"
: "${ACCOUNT:?set ACCOUNT to your AWS account id}"
OIDC_PROVIDER="${OIDC_PROVIDER:-}"
NAMESPACE="${NAMESPACE:-steel}"

for policy in steel-train steel-score steel-autoscaler steel-ecr-pull; do
  aws iam create-policy --policy-name "$policy" \
    --policy-document "$(sed "s/123456789012/$ACCOUNT/g" "$policy.json")" --output text --query Policy.Arn
done

ec2_trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
irsa_trust() {  # only pods running as service account $1 in $NAMESPACE may take the role
  printf '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Federated":"arn:aws:iam::%s:oidc-provider/%s"},"Action":"sts:AssumeRoleWithWebIdentity","Condition":{"StringEquals":{"%s:sub":"system:serviceaccount:%s:%s","%s:aud":"sts.amazonaws.com"}}}]}' \
    "$ACCOUNT" "$OIDC_PROVIDER" "$OIDC_PROVIDER" "$NAMESPACE" "$1" "$OIDC_PROVIDER"
}

role() {  # role NAME TRUST POLICY...
  local name=$1 trust=$2; shift 2
  aws iam create-role --role-name "$name" --assume-role-policy-document "$trust" --output text --query Role.Arn
  for policy in "$@"; do
    aws iam attach-role-policy --role-name "$name" --policy-arn "arn:aws:iam::$ACCOUNT:policy/$policy"
  done
}

# Ray cluster launcher (cluster.yaml): the head runs the drivers and the autoscaler.
role steel-ray-head "$ec2_trust" steel-train steel-score steel-autoscaler steel-ecr-pull
role steel-ray-worker "$ec2_trust" steel-train steel-score steel-ecr-pull
for name in steel-ray-head steel-ray-worker; do
  aws iam create-instance-profile --instance-profile-name "$name" --output text --query InstanceProfile.Arn
  aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
done

# KubeRay on EKS (IRSA): one role per service account in infra/kuberay/serviceaccount.yaml.
if [ -n "$OIDC_PROVIDER" ]; then
  role steel-train "$(irsa_trust steel-train)" steel-train
  role steel-score "$(irsa_trust steel-score)" steel-score
else
  echo "OIDC_PROVIDER not set: skipped the KubeRay roles steel-train and steel-score" >&2
fi
